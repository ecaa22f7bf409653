/**
 * The process's one logger, made before anything else so every part is handed a logger
 * that already exists. JSON lines for machines; readable lines when a person watches a
 * terminal. Both write synchronously, in the order things happen: a worker-thread
 * transport would let `listening on …` overtake the log lines before it.
 */
import { pino, type Logger } from "pino";
import pretty from "pino-pretty";

export type { Logger };

export function createLogger(level: string, tty = process.stdout.isTTY === true): Logger {
  if (level === "silent") return pino({ level });
  // pino's default stream buffers and writes later: `listening on` could overtake the lines before it.
  if (!tty) return pino({ level }, pino.destination({ dest: 1, sync: true }));
  return pino({ level }, pretty({ sync: true, translateTime: "SYS:HH:MM:ss.l", ignore: "pid,hostname" }));
}
