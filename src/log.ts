/**
 * The process's one logger, made before anything else so every part is handed a logger
 * that already exists. JSON lines for machines; readable lines when a person watches a
 * terminal. The HTTP server logs through the same instance.
 */
import { pino, type Logger } from "pino";

export type { Logger };

export function createLogger(level: string, pretty = process.stdout.isTTY === true): Logger {
  if (level === "silent" || !pretty) return pino({ level });
  return pino({ level, transport: { target: "pino-pretty", options: { translateTime: "SYS:HH:MM:ss.l", ignore: "pid,hostname" } } });
}
