import type { FastifyInstance } from "fastify";
import type { ServerOptions } from "./config/cli.js";
import { totalmem } from "node:os";
import { repositoryFromSpecs, type ModelSpec, type RepositoryConfig } from "./config/models-file.js";
import { formatBytes } from "./config/sizes.js";
import { StateFile } from "./models/repository-state.js";
import { Engine, NODE_LLAMA_CPP_VERSION, type EngineFaults } from "./engine/llama-engine.js";
import { Metrics } from "./telemetry/metrics.js";
import type { Telemetry } from "./telemetry/request-telemetry.js";
import { startTracing, tracesEndpoint } from "./telemetry/tracing.js";
import { buildApp } from "./http/app.js";
import { AccessControl } from "./http/access.js";
import { ModelRegistry } from "./models/registry.js";

const DEFAULT_RAM_SHARE = 0.7;
const DEFAULT_VRAM_SHARE = 0.9;

export interface RunningServer {
  app: FastifyInstance;
  registry: ModelRegistry;
  engine: Engine;
  telemetry: Telemetry;
  /** http://host:port */
  url: string;
  /** Stops accepting, closes the listener, disposes the models. */
  close(): Promise<void>;
  /**
   * Graceful: readiness false and new requests 503 at once, running generations may
   * finish for the grace period, then are ended with an error; then close().
   */
  shutdown(graceSeconds: number): Promise<void>;
}

/**
 * Wires engine, models and HTTP together, loads every model (throwing on the first
 * failure) and listens. Shared by the command line and the tests, so both run the
 * same server.
 */
export async function startServer(
  options: Omit<ServerOptions, "configFile" | "configExplicit" | "models">,
  models: RepositoryConfig | ModelSpec[],
  io: { progressStream?: NodeJS.WritableStream & { isTTY?: boolean }; faults?: EngineFaults; roomWaitMs?: number } = {},
): Promise<RunningServer> {
  const engine = await Engine.create(options.gpu);
  const config = Array.isArray(models) ? repositoryFromSpecs(models) : models;
  // Default budget: a safe share of the machine, leaving room for the process, the OS and page cache.
  const budget = {
    ram: options.memoryBudget ?? Math.floor(totalmem() * DEFAULT_RAM_SHARE),
    vram: engine.backend === "cpu" ? Infinity : (options.vramBudget ?? Math.floor((await engine.vramTotal()) * DEFAULT_VRAM_SHARE)),
  };
  let accepting = true;
  const endpoint = tracesEndpoint(options.otlpEndpoint);
  const telemetry: Telemetry = {
    metrics: new Metrics(engine.backend, NODE_LLAMA_CPP_VERSION, options.metrics),
    tracing: endpoint ? startTracing(endpoint, { "spindle.backend": engine.backend }) : undefined,
    // Replaced by the app's logger below, before anything logs.
    log: undefined as never,
  };
  // The registry logs through the app's logger, which exists only after buildApp.
  let app: FastifyInstance | undefined;
  const registry = new ModelRegistry(engine, config, {
    threads: options.threads,
    parallel: options.parallel,
    ctxSize: options.ctxSize,
    flashAttention: options.flashAttention,
    maxQueue: options.maxQueue,
    maxQueuedTokens: options.maxQueuedTokens,
    budget,
    maxLoaded: options.maxLoadedModels,
    stateFile: options.stateFile ? new StateFile(options.stateFile) : undefined,
    roomWaitMs: io.roomWaitMs,
    log: (msg) => app?.log.info(msg),
    warn: (msg) => app?.log.warn(msg),
    progressStream: io.progressStream,
    telemetry,
    faults: io.faults,
  });
  app = buildApp({
    registry,
    maxBodyBytes: options.maxBodyBytes,
    requestTimeoutSeconds: options.requestTimeoutSeconds,
    logLevel: options.logLevel,
    isAccepting: () => accepting,
    telemetry,
    access: new AccessControl({
      keys: options.apiKeys,
      adminKeys: options.adminKeys,
      publicAreas: options.publicAreas,
      maxConcurrent: options.keyMaxConcurrent,
      tokensPerMinute: options.keyTokensPerMinute,
    }),
    corsOrigins: options.corsOrigins,
    readTimeoutSeconds: options.readTimeoutSeconds,
  });
  telemetry.log = app.log;
  telemetry.metrics.watch(registry);
  app.log.info(`memory budget: ${formatBytes(budget.ram)} RAM${Number.isFinite(budget.vram) ? `, ${formatBytes(budget.vram)} VRAM` : ""}`);
  try {
    // Listen first: probes see "loading" (503 on /readyz) while models load and warm up.
    await app.listen({ host: options.host, port: options.port });
    await registry.start();
  } catch (err) {
    await app.close();
    await registry.dispose();
    await engine.dispose();
    await telemetry.tracing?.shutdown();
    throw err;
  }
  const a = app.server.address();
  const port = typeof a === "object" && a !== null ? a.port : options.port;
  const host = options.host.includes(":") ? `[${options.host}]` : options.host;
  const running = app;
  const close = async () => {
    accepting = false;
    await running.close();
    await registry.dispose();
    await engine.dispose();
    // Flushes the spans still batched.
    await telemetry.tracing?.shutdown();
  };
  return {
    app: running,
    registry,
    engine,
    telemetry,
    url: `http://${host}:${port}`,
    async shutdown(graceSeconds) {
      accepting = false;
      await registry.drain(graceSeconds * 1000);
      await close();
    },
    close,
  };
}
