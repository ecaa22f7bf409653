import { ensureArtifact } from "../config/artifact.js";
import type { ModelSpec, SamplingDefaults } from "../config/models-file.js";
import { Engine, GREEDY_SAMPLING, type EngineFaults, type EngineModel } from "../engine/llama-engine.js";
import { ApiError } from "../errors.js";
import { Scheduler } from "../scheduler/scheduler.js";
import type { GenerationSink } from "../scheduler/types.js";
import { lifecycleSpan, type Telemetry } from "../telemetry/request-telemetry.js";

export type ModelState = "loading" | "ready" | "failed";

export interface ModelEntry {
  readonly id: string;
  readonly version: string;
  readonly path: string;
  state: ModelState;
  error: string | undefined;
  engine: EngineModel | undefined;
  scheduler: Scheduler | undefined;
  readonly sampling: SamplingDefaults;
  /** Unix seconds when it became ready (the OpenAI `created`). */
  created: number;
  loadSeconds: number | undefined;
  warmupSeconds: number | undefined;
}

export interface RegistryOptions {
  threads: number;
  parallel: number | undefined;
  ctxSize: number | undefined;
  flashAttention: "auto" | "on" | "off";
  maxQueue: number;
  maxQueuedTokens: number;
  log: (msg: string) => void;
  telemetry?: Telemetry;
  /** Test-only fault injection. */
  faults?: EngineFaults;
  progressStream?: NodeJS.WritableStream & { isTTY?: boolean };
}

const DEFAULT_PARALLEL = 4;

/** The models this server serves, their state, and their schedulers. */
export class ModelRegistry {
  private readonly entries = new Map<string, ModelEntry>();

  constructor(
    private readonly engine: Engine,
    private readonly specs: readonly ModelSpec[],
    private readonly opts: RegistryOptions,
  ) {
    for (const s of specs) {
      this.entries.set(s.id, {
        id: s.id,
        version: s.version,
        path: s.path,
        state: "loading",
        error: undefined,
        engine: undefined,
        scheduler: undefined,
        sampling: s.sampling,
        created: Math.floor(Date.now() / 1000),
        loadSeconds: undefined,
        warmupSeconds: undefined,
      });
    }
  }

  list(): ModelEntry[] {
    return [...this.entries.values()];
  }

  get ready(): boolean {
    return this.list().every((e) => e.state === "ready");
  }

  /** The entry serving `id`, or the error a client should see. */
  resolve(id: string): ModelEntry & { engine: EngineModel; scheduler: Scheduler } {
    const entry = this.entries.get(id);
    if (entry === undefined) {
      throw new ApiError("not_found", `The model '${id}' does not exist.`, { param: "model", code: "model_not_found" });
    }
    if (entry.state === "loading") {
      throw new ApiError("unavailable", `The model '${id}' is loading.`, { code: "model_loading", retryAfter: 5 });
    }
    if (entry.state === "failed" || entry.engine === undefined || entry.scheduler === undefined) {
      throw new ApiError("unavailable", `The model '${id}' failed to load: ${entry.error}`, { code: "model_failed", retryAfter: 60 });
    }
    return entry as ModelEntry & { engine: EngineModel; scheduler: Scheduler };
  }

  /** Loads every model, one at a time. Throws the first failure (the server then exits). */
  async loadAll(): Promise<void> {
    for (const spec of this.specs) {
      const entry = this.entries.get(spec.id)!;
      const t0 = performance.now();
      try {
        await this.load(spec, entry);
      } catch (err) {
        entry.state = "failed";
        entry.error = (err as Error).message;
        const telemetry = this.opts.telemetry;
        if (telemetry) {
          telemetry.metrics.modelLoadFailed(spec.id, spec.version);
          lifecycleSpan(telemetry, "model.load", t0, performance.now(), { "gen_ai.request.model": spec.id, "spindle.model.version": spec.version }, entry.error);
        }
        throw err;
      }
    }
  }

  private async load(spec: ModelSpec, entry: ModelEntry): Promise<void> {
    await ensureArtifact(spec, { progressStream: this.opts.progressStream, log: this.opts.log });
    const t0 = performance.now();
    const scheduler = new Scheduler({
      maxQueue: this.opts.maxQueue,
      maxQueuedTokens: this.opts.maxQueuedTokens,
      observer: this.opts.telemetry?.metrics.schedulerObserver(spec.id, spec.version),
    });
    const engineModel = await this.engine.loadModel({
      id: spec.id,
      path: spec.path,
      // Command-line values override the models file, so one flag tunes every model.
      ctxSize: this.opts.ctxSize ?? spec.ctxSize,
      parallel: this.opts.parallel ?? spec.parallel ?? DEFAULT_PARALLEL,
      threads: this.opts.threads,
      chatTemplate: spec.chatTemplate,
      flashAttention: this.opts.flashAttention,
      observer: scheduler,
      faults: this.opts.faults,
    });
    scheduler.attach(engineModel);
    entry.engine = engineModel;
    entry.scheduler = scheduler;
    entry.loadSeconds = (performance.now() - t0) / 1000;
    const t1 = performance.now();
    await warmUp(engineModel, scheduler);
    const t2 = performance.now();
    entry.warmupSeconds = (t2 - t1) / 1000;
    const telemetry = this.opts.telemetry;
    if (telemetry) {
      telemetry.metrics.modelLoaded(spec.id, spec.version, entry.loadSeconds, entry.warmupSeconds);
      const attrs = { "gen_ai.request.model": spec.id, "spindle.model.version": spec.version };
      lifecycleSpan(telemetry, "model.load", t0, t1, attrs);
      lifecycleSpan(telemetry, "model.warmup", t1, t2, attrs);
    }
    entry.state = "ready";
    entry.created = Math.floor(Date.now() / 1000);
    this.opts.log(
      `model "${spec.id}" ready: ${engineModel.parallel} slots x ${engineModel.ctxSize} tokens, template ${engineModel.templateName}, ` +
        `load ${entry.loadSeconds.toFixed(2)}s, warmup ${entry.warmupSeconds.toFixed(3)}s`,
    );
  }

  /**
   * Stops taking work (queued requests get 503), lets running generations finish for
   * up to `graceMs`, then ends the rest with a clear error.
   */
  async drain(graceMs: number): Promise<void> {
    const schedulers = this.list().flatMap((e) => (e.scheduler ? [e.scheduler] : []));
    for (const s of schedulers) s.close();
    const idle = await Promise.all(schedulers.map((s) => s.idle(graceMs)));
    if (idle.every(Boolean)) return;
    const ended = new ApiError("unavailable", "The server is shutting down: the generation was ended after the shutdown grace period.", { code: "shutting_down", retryAfter: 5 });
    for (const s of schedulers) s.terminate(ended);
    await Promise.all(schedulers.map((s) => s.idle(5000)));
  }

  async dispose(): Promise<void> {
    for (const e of this.entries.values()) {
      e.scheduler?.close();
      await e.engine?.dispose();
      e.engine = undefined;
    }
  }
}

/** A short real generation through the scheduler: the model is ready only once this works. */
async function warmUp(model: EngineModel, scheduler: Scheduler): Promise<void> {
  const ignore: GenerationSink = { onStart() {}, onText() {}, onDone() {}, onError() {} };
  const outcome = await scheduler.submit(
    {
      promptTokens: model.tokenizePrompt("Hello"),
      maxTokens: 4,
      stop: [],
      sampling: GREEDY_SAMPLING,
      priority: "normal",
      deadline: performance.now() + 60_000,
      signal: new AbortController().signal,
      timeline: {},
    },
    ignore,
  );
  if ("error" in outcome) throw new Error(`model "${model.id}": warmup failed: ${outcome.error.message}`);
}
