/**
 * Residency: which model versions are in memory, within a budget decided before any load.
 *
 * Every version has an entry. A request takes a lease on its version (acquire), which
 * loads the version when it is not resident: the load waits its turn (one load or
 * eviction at a time, so the budget arithmetic is never raced), evicts least recently
 * used idle versions until the estimate fits, loads, warms up, and only then marks the
 * version ready. A version with leases is never evicted under them; a pinned one never.
 * The request waits for all this up to its own deadline, then gets 503 + Retry-After.
 */
import { ArtifactError, ensureArtifact } from "../config/artifact.js";
import type { ModelSpec, SamplingDefaults, WarmupFixture } from "../config/models-file.js";
import { Engine, GREEDY_SAMPLING, type EngineFaults, type EngineModel, type MemoryFootprint } from "../engine/llama-engine.js";
import { ApiError } from "../errors.js";
import { Scheduler } from "../scheduler/scheduler.js";
import type { GenerationSink } from "../scheduler/types.js";
import { lifecycleSpan, type Telemetry } from "../telemetry/request-telemetry.js";
import { formatBytes } from "../config/sizes.js";

/**
 * unloaded: known, not in memory (never loaded, or evicted); loading: artifact, load or
 * warm-up under way; ready: loaded and warmed, serving; unloading: being evicted;
 * failed: cannot be served (bad artifact, load or warm-up error), with the reason.
 */
export type ModelState = "unloaded" | "loading" | "ready" | "unloading" | "failed";

export interface ModelEntry {
  readonly id: string;
  readonly version: string;
  /** "id@version" */
  readonly key: string;
  readonly spec: ModelSpec;
  readonly warmup: WarmupFixture;
  state: ModelState;
  error: string | undefined;
  engine: EngineModel | undefined;
  scheduler: Scheduler | undefined;
  readonly sampling: SamplingDefaults;
  /** Unix seconds when it last became ready (the OpenAI `created`). */
  created: number;
  loadSeconds: number | undefined;
  warmupSeconds: number | undefined;
  /** Seconds from the load's start (artifact check included) to ready. */
  readySeconds: number | undefined;
  estimate: MemoryFootprint | undefined;
  /** What llama.cpp reported it allocated, once loaded. */
  actual: MemoryFootprint | undefined;
  /** Leases held: requests (and promotions) using it now. */
  active: number;
  /** performance.now() of its last acquire or release: the LRU order. */
  lastUsed: number;
  /** Completed loads, evictions: the swap count. */
  loads: number;
  evictions: number;
  /** It has been ready at least once (an evicted version is known good). */
  everReady: boolean;
}

export type ReadyEntry = ModelEntry & { engine: EngineModel; scheduler: Scheduler };

export interface Lease {
  readonly entry: ReadyEntry;
  /** Idempotent. */
  release(): void;
}

export interface ResidencyOptions {
  budget: MemoryFootprint;
  /** 0: no cap on resident versions. */
  maxLoaded: number;
  threads: number;
  parallel: number | undefined;
  ctxSize: number | undefined;
  flashAttention: "auto" | "on" | "off";
  maxQueue: number;
  maxQueuedTokens: number;
  log: (msg: string) => void;
  warn: (msg: string) => void;
  telemetry?: Telemetry;
  faults?: EngineFaults;
  progressStream?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Pinned versions are never evicted. */
  isPinned: (entry: ModelEntry) => boolean;
  /** How long a load may wait for busy versions to become evictable before it gives up. */
  roomWaitMs?: number;
}

const DEFAULT_PARALLEL = 4;

/** Errors that end a load for now but say nothing about the version itself (it may load later). */
class TransientLoadError extends ApiError {}

export class Residency {
  readonly entries = new Map<string, ModelEntry>();
  /** The tail of the load/evict queue: one at a time. */
  private exclusiveTail: Promise<unknown> = Promise.resolve();
  private readonly loading = new Map<ModelEntry, { promise: Promise<void>; mayEvict: boolean }>();
  /** Woken whenever a lease is released or a version leaves memory. */
  private wakers: Array<() => void> = [];

  constructor(
    private readonly engine: Engine,
    private readonly opts: ResidencyOptions,
  ) {}

  add(spec: ModelSpec, warmup: WarmupFixture, failure: string | undefined): ModelEntry {
    const entry: ModelEntry = {
      id: spec.id,
      version: spec.version,
      key: `${spec.id}@${spec.version}`,
      spec,
      warmup,
      state: failure === undefined ? "unloaded" : "failed",
      error: failure,
      engine: undefined,
      scheduler: undefined,
      sampling: spec.sampling,
      created: Math.floor(Date.now() / 1000),
      loadSeconds: undefined,
      warmupSeconds: undefined,
      readySeconds: undefined,
      estimate: undefined,
      actual: undefined,
      active: 0,
      lastUsed: 0,
      loads: 0,
      evictions: 0,
      everReady: false,
    };
    this.entries.set(entry.key, entry);
    return entry;
  }

  get budget(): MemoryFootprint {
    return this.opts.budget;
  }

  /** Estimated bytes of what is in memory now (loaded, warming, or being unloaded). */
  used(): MemoryFootprint {
    let ram = 0;
    let vram = 0;
    for (const e of this.entries.values()) {
      if (e.engine !== undefined && e.estimate) {
        ram += e.estimate.ram;
        vram += e.estimate.vram;
      }
    }
    return { ram, vram };
  }

  resident(): ModelEntry[] {
    return [...this.entries.values()].filter((e) => e.engine !== undefined);
  }

  /** A lease when the version is ready now, without loading or waiting: shadow traffic. */
  tryAcquire(entry: ModelEntry): Lease | undefined {
    return entry.state === "ready" ? this.lease(entry) : undefined;
  }

  /**
   * A lease on a ready version, loading it first when it is not resident. Waits at most
   * until `deadline` (performance.now() ms) or the signal, then 503 with Retry-After.
   */
  async acquire(entry: ModelEntry, deadline: number, signal?: AbortSignal, mayEvict = true): Promise<Lease> {
    for (;;) {
      if (entry.state === "ready") return this.lease(entry);
      if (entry.state === "failed") throw failedError(entry);
      const load = this.ensureLoading(entry, mayEvict);
      try {
        await this.waitFor(load.promise, entry, deadline, signal);
      } catch (err) {
        // We joined a start-up load that may not evict; this request may: try again.
        if (mayEvict && !load.mayEvict && err instanceof TransientLoadError && err.code === "insufficient_memory") continue;
        throw err;
      }
    }
  }

  private lease(entry: ModelEntry): Lease {
    entry.active++;
    entry.lastUsed = performance.now();
    let released = false;
    return {
      entry: entry as ReadyEntry,
      release: () => {
        if (released) return;
        released = true;
        entry.active--;
        entry.lastUsed = performance.now();
        this.wake();
      },
    };
  }

  private wake(): void {
    const w = this.wakers;
    this.wakers = [];
    for (const f of w) f();
  }

  /** Resolves at the next release or unload, or after `ms`. */
  private nextChange(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, Math.max(0, ms));
      this.wakers.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  private async waitFor(load: Promise<void>, entry: ModelEntry, deadline: number, signal: AbortSignal | undefined): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const limit = new Promise<never>((_, reject) => {
      const left = deadline - performance.now();
      const late = () =>
        new ApiError("unavailable", `The model version '${entry.key}' is loading and was not ready within the request's deadline.`, {
          code: "model_loading",
          retryAfter: Math.max(1, Math.ceil(entry.readySeconds ?? 5)),
        });
      timer = setTimeout(() => reject(late()), Math.max(0, left));
      if (signal) {
        onAbort = () => reject(new ApiError("cancelled", "The client went away while the model was loading.", { code: "client_disconnected" }));
        if (signal.aborted) onAbort();
        else signal.addEventListener("abort", onAbort, { once: true });
      }
    });
    try {
      await Promise.race([load, limit]);
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener("abort", onAbort);
    }
  }

  /** The one load of this version in progress, started when there is none. */
  private ensureLoading(entry: ModelEntry, mayEvict: boolean): { promise: Promise<void>; mayEvict: boolean } {
    let load = this.loading.get(entry);
    if (!load) {
      const promise = this.load(entry, mayEvict).finally(() => this.loading.delete(entry));
      // Every waiter handles the outcome; this keeps a load nobody awaits any more quiet.
      promise.catch(() => {});
      load = { promise, mayEvict };
      this.loading.set(entry, load);
    }
    return load;
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    // The tail never rejects (see below), so fn runs once the previous job settled.
    const run = this.exclusiveTail.then(fn);
    this.exclusiveTail = run.catch(() => {});
    return run;
  }

  private async load(entry: ModelEntry, mayEvict: boolean): Promise<void> {
    const t0 = performance.now();
    entry.state = "loading";
    entry.error = undefined;
    const spec = entry.spec;
    const telemetry = this.opts.telemetry;
    try {
      // Fetching the artifact does not hold the queue: other versions load meanwhile.
      try {
        await ensureArtifact(spec, { progressStream: this.opts.progressStream, log: this.opts.log });
      } catch (err) {
        // A download that failed is kept (.partial) and resumed by the next request's load.
        if (err instanceof ArtifactError && err.transient) throw new TransientLoadError("unavailable", err.message, { code: "artifact_unavailable", retryAfter: 10 });
        throw err;
      }
      entry.estimate ??= await this.engine.estimate(this.loadShape(entry));
      await this.exclusive(async () => {
        // An eviction of this very entry may have been queued before us: wait it out.
        if (entry.engine !== undefined) {
          entry.state = "ready";
          return;
        }
        await this.makeRoom(entry, mayEvict);
        await this.loadInto(entry, t0);
      });
    } catch (err) {
      if (err instanceof TransientLoadError) {
        entry.state = "unloaded";
        entry.error = err.message;
        this.opts.warn(`model version ${entry.key} not loaded: ${err.message}`);
        throw err;
      }
      entry.state = "failed";
      entry.error = (err as Error).message;
      this.opts.warn(`model version ${entry.key} failed: ${entry.error}`);
      if (telemetry) {
        telemetry.metrics.modelLoadFailed(entry.id, entry.version);
        lifecycleSpan(telemetry, "model.load", t0, performance.now(), { "gen_ai.request.model": entry.id, "spindle.model.version": entry.version }, entry.error);
      }
      throw failedError(entry);
    }
  }

  private loadShape(entry: ModelEntry) {
    const spec = entry.spec;
    return {
      id: entry.key,
      path: spec.path,
      // Command-line values override the models file, so one flag tunes every model.
      ctxSize: this.opts.ctxSize ?? spec.ctxSize,
      parallel: this.opts.parallel ?? spec.parallel ?? DEFAULT_PARALLEL,
      flashAttention: this.opts.flashAttention,
      gpuLayers: spec.gpuLayers,
    };
  }

  private fits(need: MemoryFootprint): boolean {
    const used = this.used();
    const { ram, vram } = this.opts.budget;
    const count = this.resident().length;
    return used.ram + need.ram <= ram && used.vram + need.vram <= vram && (this.opts.maxLoaded === 0 || count < this.opts.maxLoaded);
  }

  /**
   * Evicts least recently used idle, unpinned versions until `entry` fits. Busy ones are
   * waited for (bounded); a version larger than the whole budget fails at once.
   */
  private async makeRoom(entry: ModelEntry, mayEvict: boolean): Promise<void> {
    const need = entry.estimate!;
    const budget = this.opts.budget;
    if (need.ram > budget.ram || need.vram > budget.vram) {
      throw new Error(
        `needs ${formatBytes(need.ram)} RAM${need.vram > 0 ? ` and ${formatBytes(need.vram)} VRAM` : ""} (estimated), more than the whole memory budget ` +
          `(${formatBytes(budget.ram)} RAM${budget.vram !== Infinity ? `, ${formatBytes(budget.vram)} VRAM` : ""}); raise --memory-budget or lower ctx_size/parallel`,
      );
    }
    const giveUp = performance.now() + (this.opts.roomWaitMs ?? 30_000);
    while (!this.fits(need)) {
      const candidates = this.resident().filter((e) => !this.opts.isPinned(e));
      if (!mayEvict) throw new TransientLoadError("unavailable", `The model version '${entry.key}' does not fit beside the resident ones.`, { code: "insufficient_memory", retryAfter: 5 });
      if (candidates.length === 0) {
        throw new TransientLoadError("unavailable", `The model version '${entry.key}' does not fit beside the pinned versions (${this.resident().map((e) => e.key).join(", ")}).`, {
          code: "insufficient_memory",
          retryAfter: 30,
        });
      }
      const idle = candidates.filter((e) => e.state === "ready" && e.active === 0 && e.scheduler!.busySlots === 0 && e.scheduler!.waiting === 0);
      idle.sort((a, b) => a.lastUsed - b.lastUsed);
      const victim = idle[0];
      if (victim) {
        await this.evict(victim, "lru");
        continue;
      }
      const left = giveUp - performance.now();
      if (left <= 0) {
        throw new TransientLoadError("unavailable", `The model version '${entry.key}' needs memory that busy versions hold (${candidates.map((e) => e.key).join(", ")}); try again shortly.`, {
          code: "insufficient_memory",
          retryAfter: 5,
        });
      }
      await this.nextChange(Math.min(left, 1000));
    }
  }

  private async loadInto(entry: ModelEntry, t0: number): Promise<void> {
    const shape = this.loadShape(entry);
    const scheduler = new Scheduler({
      maxQueue: this.opts.maxQueue,
      maxQueuedTokens: this.opts.maxQueuedTokens,
      observer: this.opts.telemetry?.metrics.schedulerObserver(entry.id, entry.version),
    });
    const tLoad = performance.now();
    const engineModel = await this.engine.loadModel({
      ...shape,
      threads: entry.spec.threads ?? this.opts.threads,
      chatTemplate: entry.spec.chatTemplate,
      observer: scheduler,
      faults: this.opts.faults,
    });
    scheduler.attach(engineModel);
    entry.engine = engineModel;
    entry.scheduler = scheduler;
    entry.actual = engineModel.memoryUsage;
    const t1 = performance.now();
    entry.loadSeconds = (t1 - tLoad) / 1000;
    try {
      await warmUp(engineModel, scheduler, entry.warmup);
    } catch (err) {
      await this.release(entry);
      throw err;
    }
    const t2 = performance.now();
    entry.warmupSeconds = (t2 - t1) / 1000;
    entry.readySeconds = (t2 - t0) / 1000;
    entry.loads++;
    entry.everReady = true;
    entry.lastUsed = performance.now();
    entry.created = Math.floor(Date.now() / 1000);
    entry.state = "ready";
    entry.error = undefined;
    const telemetry = this.opts.telemetry;
    if (telemetry) {
      telemetry.metrics.modelLoaded(entry.id, entry.version, entry.loadSeconds, entry.warmupSeconds);
      const attrs = { "gen_ai.request.model": entry.id, "spindle.model.version": entry.version };
      lifecycleSpan(telemetry, "model.load", tLoad, t1, attrs);
      lifecycleSpan(telemetry, "model.warmup", t1, t2, attrs);
    }
    const u = this.used();
    this.opts.log(
      `model ${entry.key} ready: ${engineModel.parallel} slots x ${engineModel.ctxSize} tokens, template ${engineModel.templateName}, ` +
        `memory ${formatBytes(entry.actual.ram)} (estimated ${formatBytes(entry.estimate!.ram)}), load ${entry.loadSeconds.toFixed(2)}s, ` +
        `warmup ${entry.warmupSeconds.toFixed(3)}s; resident ${formatBytes(u.ram)} of ${formatBytes(this.opts.budget.ram)}`,
    );
  }

  /** Frees a version's memory. Callers hold the exclusive queue. */
  private async release(entry: ModelEntry): Promise<void> {
    entry.scheduler?.close();
    const engineModel = entry.engine;
    entry.engine = undefined;
    entry.scheduler = undefined;
    entry.actual = undefined;
    // Estimates stay: the next load of this version needs no GGUF read.
    await engineModel?.dispose();
    this.wake();
  }

  private async evict(entry: ModelEntry, reason: "lru" | "admin"): Promise<void> {
    entry.state = "unloading";
    const idleFor = (performance.now() - entry.lastUsed) / 1000;
    await this.release(entry);
    entry.evictions++;
    if (entry.state === "unloading") entry.state = "unloaded";
    this.opts.telemetry?.metrics.modelEvicted(entry.id, entry.version, reason);
    this.opts.log(`model ${entry.key} unloaded (${reason === "lru" ? `least recently used, idle ${idleFor.toFixed(1)}s` : "by an operator"})`);
  }

  /** An operator's unload: refused for pinned versions, waits (bounded) for running requests. */
  async unload(entry: ModelEntry, waitMs: number): Promise<void> {
    if (this.opts.isPinned(entry)) throw new ApiError("conflict", `${entry.key} is pinned: it is never unloaded.`, { code: "model_pinned" });
    await this.exclusive(async () => {
      const giveUp = performance.now() + waitMs;
      while (entry.state === "ready" && entry.active > 0) {
        if (performance.now() >= giveUp) throw new ApiError("conflict", `${entry.key} is serving ${entry.active} request(s); try again when it is idle.`, { code: "model_busy" });
        await this.nextChange(giveUp - performance.now());
      }
      if (entry.state === "ready") await this.evict(entry, "admin");
    });
  }

  /** Clears a failure so the version may be loaded again (an operator fixed the artifact). */
  retry(entry: ModelEntry): void {
    if (entry.state === "failed") {
      entry.state = "unloaded";
      entry.error = undefined;
    }
  }

  async disposeAll(): Promise<void> {
    await this.exclusive(async () => {
      for (const e of this.entries.values()) {
        if (e.engine) await this.release(e);
        if (e.state !== "failed") e.state = "unloaded";
      }
    });
  }
}

function failedError(entry: ModelEntry): ApiError {
  return new ApiError("unavailable", `The model version '${entry.key}' failed to load: ${entry.error}`, { code: "model_failed", retryAfter: 60 });
}

/** A short real generation through the scheduler: the version is ready only once this works. */
async function warmUp(model: EngineModel, scheduler: Scheduler, fixture: WarmupFixture): Promise<void> {
  const ignore: GenerationSink = { onStart() {}, onText() {}, onDone() {}, onError() {} };
  const outcome = await scheduler.submit(
    {
      promptTokens: model.tokenizePrompt(fixture.prompt),
      maxTokens: fixture.maxTokens,
      stop: [],
      sampling: GREEDY_SAMPLING,
      priority: "normal",
      deadline: performance.now() + 60_000,
      signal: new AbortController().signal,
      timeline: {},
    },
    ignore,
  );
  if ("error" in outcome) throw new Error(`warmup failed: ${outcome.error.message}`);
}
