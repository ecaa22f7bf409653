import { resolve } from "node:path";
import { Writable } from "node:stream";
import { pino } from "pino";
import type { Logger } from "../../src/log.js";
import OpenAI from "openai";
import type { ModelSpec } from "../../src/config/models-file.js";
import { defaultServerOptions } from "../../src/config/options.js";
import { startServer, type RunningServer, type StartOptions } from "../../src/server.js";

export const SHARED_MODELS = resolve(import.meta.dirname, "../../../shared/models");
export const sharedModel = (file: string) => resolve(SHARED_MODELS, file);

export interface TestModel {
  id: string;
  file: string;
  chatTemplate?: string;
  ctxSize?: number;
  parallel?: number;
  /** Serve /v1/embeddings too (true), optionally with Matryoshka truncations. */
  embeddings?: boolean | { dimensions: number[] };
}

export function spec(m: TestModel): ModelSpec {
  return {
    id: m.id,
    version: "test",
    path: m.file.startsWith("/") ? m.file : sharedModel(m.file),
    sha256: undefined,
    sources: [],
    chatTemplate: m.chatTemplate,
    ctxSize: m.ctxSize,
    parallel: m.parallel,
    sampling: {},
    embeddings: m.embeddings === true ? { dimensions: [] } : m.embeddings || undefined,
  };
}

export type TestServerOptions = Partial<StartOptions>;

/** Options for a test server: the declared defaults, on a free loopback port, on the CPU, quiet, unless overridden. */
export function testServerOptions(opts: TestServerOptions = {}): StartOptions {
  return { ...defaultServerOptions(), port: 0, gpu: "cpu", logLevel: "silent", shutdownGraceSeconds: 5, ...opts };
}

/** The real server, real engine, on a free port. */
export async function startTestServer(models: TestModel[], opts: TestServerOptions = {}, io: Parameters<typeof startServer>[2] = {}): Promise<RunningServer> {
  return startServer(testServerOptions(opts), models.map(spec), io);
}

export function openaiClient(server: RunningServer, extra: Partial<ConstructorParameters<typeof OpenAI>[0]> = {}): OpenAI {
  // No retries: a test must see the server's first answer.
  return new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0, ...extra });
}

export const STORIES: TestModel = { id: "stories260K", file: "stories260K.gguf", chatTemplate: "general", ctxSize: 512 };
export const STORIES_CHAT: TestModel = { id: "stories260K-chat", file: "stories260K-chat.gguf", ctxSize: 512 };
export const TINY_RANDOM: TestModel = { id: "llama-2-tiny-random", file: "llama-2-tiny-random.gguf", ctxSize: 512 };

/** The greedy continuation of "Once upon a time" that llama.cpp itself produces (shared/models/README.md). */
export const STORIES_GREEDY_PREFIX = ", there was a little girl named Lily. She loved to play outside in the park.";

export async function waitFor(cond: () => boolean, timeoutMs = 5000, stepMs = 5): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

/** A logger whose JSON lines the test can read (the server logs through it instead of stdout). */
export function captureLog(): { log: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString("utf8").split("\n")) if (l.trim() !== "") lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { log: pino({ level: "info" }, sink), lines };
}
