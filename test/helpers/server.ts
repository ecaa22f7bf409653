import { resolve } from "node:path";
import OpenAI from "openai";
import { defaultThreads, type ServerOptions } from "../../src/config/cli.js";
import type { ModelSpec } from "../../src/config/models-file.js";
import { startServer, type RunningServer } from "../../src/server.js";

export const SHARED_MODELS = resolve(import.meta.dirname, "../../../shared/models");
export const sharedModel = (file: string) => resolve(SHARED_MODELS, file);

export interface TestModel {
  id: string;
  file: string;
  chatTemplate?: string;
  ctxSize?: number;
  parallel?: number;
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
  };
}

export type TestServerOptions = Partial<Omit<ServerOptions, "configFile" | "configExplicit" | "models">>;

/** Options for a test server: a free loopback port, no auth, quiet logs, unless overridden. */
export function testServerOptions(opts: TestServerOptions = {}): Parameters<typeof startServer>[0] {
  return {
      host: "127.0.0.1",
      port: 0,
      threads: defaultThreads(),
      gpu: "cpu",
      parallel: undefined,
      ctxSize: undefined,
      flashAttention: "auto",
      maxQueue: 64,
      maxQueuedTokens: 65536,
      requestTimeoutSeconds: 600,
      maxBodyBytes: 4 * 1024 * 1024,
      logLevel: "silent",
      otlpEndpoint: undefined,
      metrics: true,
      apiKeys: [],
      adminKeys: [],
      publicAreas: ["health", "page"],
      corsOrigins: [],
      keyMaxConcurrent: 0,
      keyTokensPerMinute: 0,
      shutdownGraceSeconds: 5,
      readTimeoutSeconds: 30,
      memoryBudget: undefined,
      vramBudget: undefined,
      maxLoadedModels: 0,
      stateFile: undefined,
      ...opts,
  };
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
