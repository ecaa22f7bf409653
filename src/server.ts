/**
 * The composition root: makes the logger, the engine, telemetry, the model registry,
 * the services and the HTTP app, in that order, and plugs each into the next. Shared by
 * the command line and the tests, so both run the same server.
 */
import { totalmem } from "node:os";
import type { FastifyInstance } from "fastify";
import { KeyRing } from "./access/keys.js";
import { KeyLimits } from "./access/limits.js";
import { plainKey, readKeysFile } from "./config/keys-file.js";
import { repositoryFromSpecs, type ModelSpec, type RepositoryConfig } from "./config/models-file.js";
import type { ServerOptions } from "./config/options.js";
import { formatBytes } from "./config/sizes.js";
import { Engine } from "./engine/engine.js";
import { LONE_STEPS_SAID } from "./engine/step-thread.js";
import { NODE_LLAMA_CPP_VERSION, type EngineFaults } from "./engine/types.js";
import { buildApp, type AppOptions } from "./http/app.js";
import { createLogger, type Logger } from "./log.js";
import { ModelRegistry } from "./models/registry.js";
import { StateFile } from "./models/repository-state.js";
import { GenerationService } from "./service/generation-service.js";
import { ModelService } from "./service/model-service.js";
import { ResponseStore } from "./service/response-store.js";
import { TextService } from "./service/text-service.js";
import { createTelemetry, type Telemetry } from "./telemetry/telemetry.js";

const DEFAULT_RAM_SHARE = 0.7;
const DEFAULT_VRAM_SHARE = 0.9;

export type StartOptions = Omit<ServerOptions, "configFile" | "configExplicit" | "models">;

export interface StartIo {
  progressStream?: NodeJS.WritableStream & { isTTY?: boolean };
  faults?: EngineFaults;
  roomWaitMs?: number;
  /** A logger of the caller's (tests capture lines); default: one made from --log-level. */
  log?: Logger;
  /** Transport limits tests shrink. */
  app?: Pick<AppOptions, "maxStreamBufferBytes" | "maxFrameBytes" | "socketLimits">;
}

export interface RunningServer {
  app: FastifyInstance;
  registry: ModelRegistry;
  generation: GenerationService;
  keys: KeyRing;
  telemetry: Telemetry;
  log: Logger;
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

/** Loads every model it can (failing when none loads) and listens. */
export async function startServer(options: StartOptions, models: RepositoryConfig | ModelSpec[], io: StartIo = {}): Promise<RunningServer> {
  const log = io.log ?? createLogger(options.logLevel);
  // Keys first: a bad keys file is a configuration error before anything loads.
  const keys = new KeyRing([...options.apiKeys.map(plainKey), ...(options.apiKeysFile ? readKeysFile(options.apiKeysFile) : [])], options.adminKeys, {
    maxConcurrent: options.keyMaxConcurrent,
    tokensPerMinute: options.keyTokensPerMinute,
  });
  const engine = await Engine.create(options.gpu, options.engineBuild, options.stepThread);
  const config = Array.isArray(models) ? repositoryFromSpecs(models) : models;
  // Default budget: a safe share of the machine, leaving room for the process, the OS and page cache.
  const budget = {
    ram: options.memoryBudget ?? Math.floor(totalmem() * DEFAULT_RAM_SHARE),
    vram: engine.backend === "cpu" ? Infinity : (options.vramBudget ?? Math.floor((await engine.vramTotal()) * DEFAULT_VRAM_SHARE)),
  };
  const telemetry = createTelemetry({ backend: engine.backend, engineVersion: NODE_LLAMA_CPP_VERSION, engineBuild: engine.build, metrics: options.metrics, otlpEndpoint: options.otlpEndpoint, log });
  const registry = new ModelRegistry(engine, config, {
    threads: options.threads,
    parallel: options.parallel,
    ctxSize: options.ctxSize,
    slots: options.slots,
    speculative: options.speculative,
    speculativeDisableByBatchSize: options.speculativeDisableByBatchSize,
    chatTemplate: options.chatTemplate,
    flashAttention: options.flashAttention,
    cacheTypeK: options.cacheTypeK,
    cacheTypeV: options.cacheTypeV,
    noMmap: options.noMmap,
    maxQueue: options.maxQueue,
    maxQueuedTokens: options.maxQueuedTokens,
    schedulerDelayFactor: options.schedulerDelayFactor,
    budget,
    maxLoaded: options.maxLoadedModels,
    stateFile: options.stateFile ? new StateFile(options.stateFile) : undefined,
    loadPolicy: options.loadOnDemand,
    roomWaitMs: io.roomWaitMs,
    log,
    events: telemetry.models,
    progressStream: io.progressStream,
    faults: io.faults,
  });
  telemetry.metrics.watch(() => registry.snapshot());
  let accepting = true;
  const isAccepting = () => accepting;
  const generation = new GenerationService({
    registry,
    limits: new KeyLimits(),
    requests: telemetry.requests,
    onShadow: (model, version, outcome) => telemetry.models.shadow(model, version, outcome),
    defaultTimeoutSeconds: options.requestTimeoutSeconds,
    isAccepting,
  });
  const app = buildApp({
    log,
    generation,
    models: new ModelService(registry, isAccepting),
    text: new TextService(registry, options.requestTimeoutSeconds),
    responses: new ResponseStore(options.responsesStoreSize, options.responsesStoreTtlSeconds * 1000, options.responsesStoreBytes),
    keys,
    publicAreas: options.publicAreas,
    metrics: {
      enabled: telemetry.metrics.enabled,
      scrape: () => telemetry.metrics.scrape(),
    },
    maxBodyBytes: options.maxBodyBytes,
    readTimeoutSeconds: options.readTimeoutSeconds,
    corsOrigins: options.corsOrigins,
    wsMaxConnections: options.wsMaxConnections,
    wsMaxConnectionsPerClient: options.wsMaxConnectionsPerClient,
    ...io.app,
  });
  log.info(`engine: node-llama-cpp ${NODE_LLAMA_CPP_VERSION}, ${engine.backend}, ${engine.build.type === "local" ? "local build (npm run engine:build)" : "prebuilt binary"}, ggml CPU variant ${engine.build.cpuVariant}, ${LONE_STEPS_SAID[engine.loneSteps]}${engine.runsAhead ? ", greedy ones run ahead there" : ""}`);
  log.info(`memory budget: ${formatBytes(budget.ram)} RAM${Number.isFinite(budget.vram) ? `, ${formatBytes(budget.vram)} VRAM` : ""}`);
  try {
    // Listen first: probes see "loading" (503 on /readyz) while models load and warm up.
    await app.listen({ host: options.host, port: options.port, listenTextResolver: (address) => `accepting connections on ${address}; /readyz answers 503 until the models are loaded and warm` });
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
  const close = async () => {
    accepting = false;
    await app.close();
    await registry.dispose();
    await engine.dispose();
    // Flushes the spans still batched.
    await telemetry.tracing?.shutdown();
  };
  return {
    app,
    registry,
    generation,
    keys,
    telemetry,
    log,
    url: `http://${host}:${port}`,
    async shutdown(graceSeconds) {
      accepting = false;
      await registry.drain(graceSeconds * 1000);
      await close();
    },
    close,
  };
}
