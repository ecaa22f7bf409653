/**
 * Residency: which model versions are in memory, within a budget decided before any load.
 *
 * Every version has a record, owned here and changed only by this module. A request
 * takes a lease on its version (acquire), which loads the version when it is not
 * resident: the load waits its turn (one load or eviction at a time, so the budget
 * arithmetic is never raced), evicts least recently used idle versions until the
 * estimate fits, loads, warms up, and only then marks the version ready. A version with
 * leases is never evicted under them; a pinned one never. The request waits for all this
 * up to its own deadline, then gets 503 + Retry-After. Everyone else reads snapshots.
 */
import { ArtifactError, ensureArtifact } from "../config/artifact.js";
import type { ModelSpec, WarmupFixture } from "../config/models-file.js";
import { formatBytes } from "../config/sizes.js";
import type { Engine } from "../engine/engine.js";
import type { EngineModel } from "../engine/model.js";
import { GREEDY_SAMPLING, type EngineFaults, type KvCacheType, type MemoryFootprint, type SlotClass, type SpeculativeOptions } from "../engine/types.js";
import { ApiError } from "../errors.js";
import type { Logger } from "../log.js";
import type { EvictionReason, ModelEvents, ModelState, VersionSnapshot } from "../observers.js";
import { Scheduler } from "../scheduler/scheduler.js";
import { StepTracker } from "../scheduler/step-tracker.js";

/** A version while it is in memory: what a lease hands out. Immutable; a reload makes a new one. */
export interface LoadedModel {
  readonly key: string;
  readonly id: string;
  readonly version: string;
  readonly spec: ModelSpec;
  readonly engine: EngineModel;
  readonly scheduler: Scheduler;
}

export interface Lease {
  readonly model: LoadedModel;
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
  /** Slot classes for every version (--slots), over the models file's. */
  slots?: SlotClass[];
  /** Speculative decoding for every version (--speculative), over the models file's. */
  speculative?: SpeculativeOptions;
  /** Every version's speculation pauses above this many generations (--speculative-disable-by-batch-size), the models file's included. */
  speculativeDisableByBatchSize?: number;
  /** Overrides every version's chat template (--chat-template). */
  chatTemplate?: string;
  flashAttention: "auto" | "on" | "off";
  /** KV cache types for every version (--cache-type-k/-v), over the models file's. */
  cacheTypeK?: KvCacheType;
  cacheTypeV?: KvCacheType;
  /** Every version's weights are read into memory (--no-mmap), over the models file's `mmap`. */
  noMmap?: boolean;
  maxQueue: number;
  maxQueuedTokens: number;
  /** Arrivals at an idle slot class wait this fraction of a recent step (StepTracker.arrivalGate); 0 or absent: never. */
  schedulerDelayFactor?: number;
  log: Logger;
  events: ModelEvents;
  faults?: EngineFaults;
  progressStream?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Pinned versions are never evicted. */
  isPinned: (key: string) => boolean;
  /** A version became ready (loaded and warmed): it is now served. */
  onReady?: (spec: ModelSpec) => void;
  /** How long a load may wait for busy versions to become evictable before it gives up. */
  roomWaitMs?: number;
}

const DEFAULT_PARALLEL = 4;

/** Errors that end a load for now but say nothing about the version itself (it may load later). */
class TransientLoadError extends ApiError {}

/** One version's mutable state: private to residency. */
class VersionRecord {
  state: ModelState;
  error: string | undefined;
  loaded: LoadedModel | undefined;
  created = Math.floor(Date.now() / 1000);
  loadSeconds: number | undefined;
  warmupSeconds: number | undefined;
  /** Seconds from the load's start (artifact check included) to ready. */
  readySeconds: number | undefined;
  estimate: MemoryFootprint | undefined;
  /** What llama.cpp reported it allocated, once loaded. */
  actual: MemoryFootprint | undefined;
  /** Leases held: requests (and operators' changes) using it now. */
  active = 0;
  /** performance.now() of its last acquire or release: the LRU order. */
  lastUsed = 0;
  loads = 0;
  evictions = 0;
  /** It has been ready at least once (an evicted version is known good). */
  everReady = false;

  constructor(
    readonly spec: ModelSpec,
    readonly warmup: WarmupFixture,
    failure: string | undefined,
  ) {
    this.state = failure === undefined ? "unloaded" : "failed";
    this.error = failure;
  }

  get key(): string {
    return `${this.spec.id}@${this.spec.version}`;
  }
}

export class Residency {
  private readonly records = new Map<string, VersionRecord>();
  /** The tail of the load/evict queue: one at a time. */
  private exclusiveTail: Promise<unknown> = Promise.resolve();
  private readonly loading = new Map<VersionRecord, { promise: Promise<void>; mayEvict: boolean }>();
  /** Woken whenever a lease is released or a version leaves memory. */
  private wakers: Array<() => void> = [];

  constructor(
    private readonly engine: Engine,
    private readonly opts: ResidencyOptions,
  ) {}

  add(spec: ModelSpec, warmup: WarmupFixture, failure: string | undefined): void {
    const r = new VersionRecord(spec, warmup, failure);
    this.records.set(r.key, r);
  }

  private record(key: string): VersionRecord {
    const r = this.records.get(key);
    if (!r) throw new Error(`unknown model version ${key}`);
    return r;
  }

  get budget(): MemoryFootprint {
    return this.opts.budget;
  }

  state(key: string): ModelState {
    return this.record(key).state;
  }

  /** The version's engine and scheduler while it is in memory (inspection; requests take a lease). */
  loaded(key: string): LoadedModel | undefined {
    return this.record(key).loaded;
  }

  snapshot(key: string): VersionSnapshot {
    const r = this.record(key);
    const l = r.loaded;
    return {
      key: r.key,
      id: r.spec.id,
      version: r.spec.version,
      state: r.state,
      error: r.error,
      pinned: this.opts.isPinned(r.key),
      sha256: r.spec.sha256,
      license: r.spec.license,
      source: r.spec.source,
      estimate: r.estimate ? { ...r.estimate } : undefined,
      actual: r.actual ? { ...r.actual } : undefined,
      loadSeconds: r.loadSeconds,
      warmupSeconds: r.warmupSeconds,
      readySeconds: r.readySeconds,
      loads: r.loads,
      evictions: r.evictions,
      active: r.active,
      everReady: r.everReady,
      created: r.created,
      loaded: l
        ? {
            contextLength: l.engine.ctxSize,
            parallel: l.engine.parallel,
            slotClasses: l.engine.slotClasses,
            kvCells: l.engine.kvCells,
            speculative: l.engine.speculative ? { method: l.engine.speculative.method, tokens: l.engine.speculative.tokens, ...l.engine.speculation! } : undefined,
            chatTemplate: l.engine.templateName,
            kvCacheTypes: l.engine.kvCacheTypes,
            kvBytesPerToken: l.engine.kvBytesPerToken,
            weightsBytes: l.engine.sizeBytes,
            scheduler: l.scheduler.snapshot(),
          }
        : undefined,
    };
  }

  snapshots(): VersionSnapshot[] {
    return [...this.records.keys()].map((k) => this.snapshot(k));
  }

  /** Estimated bytes of what is in memory now (loaded, warming, or being unloaded). */
  used(): MemoryFootprint {
    let ram = 0;
    let vram = 0;
    for (const r of this.records.values()) {
      if (r.loaded !== undefined && r.estimate) {
        ram += r.estimate.ram;
        vram += r.estimate.vram;
      }
    }
    return { ram, vram };
  }

  residentKeys(): string[] {
    return [...this.records.values()].filter((r) => r.loaded !== undefined).map((r) => r.key);
  }

  private resident(): VersionRecord[] {
    return [...this.records.values()].filter((r) => r.loaded !== undefined);
  }

  schedulers(): Scheduler[] {
    return this.resident().map((r) => r.loaded!.scheduler);
  }

  /** A lease when the version is ready now, without loading or waiting: shadow traffic. */
  tryAcquire(key: string): Lease | undefined {
    const r = this.record(key);
    return r.state === "ready" ? this.lease(r) : undefined;
  }

  /**
   * A lease on a ready version, loading it first when it is not resident. Waits at most
   * until `deadline` (performance.now() ms) or the signal, then 503 with Retry-After.
   */
  /**
   * `how.mayEvict`: whether a load may evict others to fit; `how.mayLoad`: whether this
   * caller may start a load at all; `how.quiet`: the caller reports a failure itself
   * (start-up does, once, with every reason).
   */
  async acquire(key: string, deadline: number, signal?: AbortSignal, how: { mayEvict?: boolean; mayLoad?: boolean; quiet?: boolean } = {}): Promise<Lease> {
    const r = this.record(key);
    const mayEvict = how.mayEvict ?? true;
    for (;;) {
      if (r.state === "ready") return this.lease(r);
      if (r.state === "failed") throw failedError(r);
      // A request that may not load a version may still wait for a load already under way.
      if (how.mayLoad === false && !this.loading.has(r)) {
        throw new ApiError("unavailable", `The model version '${key}' is not loaded, and this request may not load it (--load-on-demand).`, { code: "model_not_loaded", retryAfter: 30 });
      }
      const load = this.ensureLoading(r, mayEvict, how.quiet === true);
      try {
        await this.waitFor(load.promise, r, deadline, signal);
      } catch (err) {
        // We joined a start-up load that may not evict; this request may: try again.
        if (mayEvict && !load.mayEvict && err instanceof TransientLoadError && err.code === "insufficient_memory") continue;
        throw err;
      }
    }
  }

  private lease(r: VersionRecord): Lease {
    r.active++;
    r.lastUsed = performance.now();
    let released = false;
    return {
      model: r.loaded!,
      release: () => {
        if (released) return;
        released = true;
        r.active--;
        r.lastUsed = performance.now();
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

  private async waitFor(load: Promise<void>, r: VersionRecord, deadline: number, signal: AbortSignal | undefined): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const limit = new Promise<never>((_, reject) => {
      const left = deadline - performance.now();
      const late = () =>
        new ApiError("unavailable", `The model version '${r.key}' is loading and was not ready within the request's deadline.`, {
          code: "model_loading",
          retryAfter: Math.max(1, Math.ceil(r.readySeconds ?? 5)),
        });
      timer = setTimeout(() => reject(late()), clampTimer(left));
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
  private ensureLoading(r: VersionRecord, mayEvict: boolean, quiet: boolean): { promise: Promise<void>; mayEvict: boolean } {
    let load = this.loading.get(r);
    if (!load) {
      const promise = this.load(r, mayEvict, quiet).finally(() => this.loading.delete(r));
      // Every waiter handles the outcome; this keeps a load nobody awaits any more quiet.
      promise.catch(() => {});
      load = { promise, mayEvict };
      this.loading.set(r, load);
    }
    return load;
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    // The tail never rejects (see below), so fn runs once the previous job settled.
    const run = this.exclusiveTail.then(fn);
    this.exclusiveTail = run.catch(() => {});
    return run;
  }

  private async load(r: VersionRecord, mayEvict: boolean, quiet: boolean): Promise<void> {
    const t0 = performance.now();
    r.state = "loading";
    r.error = undefined;
    const log = this.opts.log;
    const warn = (msg: string) => quiet || log.warn(msg);
    try {
      // Fetching the artifact does not hold the queue: other versions load meanwhile.
      try {
        await ensureArtifact(r.spec, { progressStream: this.opts.progressStream, log: (m) => log.info(m) });
        // A draft model is pinned like a version: present, and the file its hash names.
        const spec = this.loadShape(r).speculative;
        if (spec?.method === "draft") await ensureArtifact({ id: `${r.key} (draft)`, path: spec.path, sha256: spec.sha256, sources: [] });
      } catch (err) {
        // A download that failed is kept (.partial) and resumed by the next request's load.
        // Why it failed (paths, sources) is for operators: clients get the code.
        if (err instanceof ArtifactError && err.transient) {
          throw new TransientLoadError("unavailable", `The model version '${r.key}' is not available yet: its file could not be fetched (a later request tries again).`, {
            code: "artifact_unavailable",
            retryAfter: 10,
            cause: err,
          });
        }
        throw err;
      }
      r.estimate ??= await this.engine.estimate(this.loadShape(r));
      await this.exclusive(async () => {
        // An eviction of this very version may have been queued before us: wait it out.
        if (r.loaded !== undefined) {
          r.state = "ready";
          return;
        }
        await this.makeRoom(r, mayEvict);
        await this.loadInto(r, t0);
      });
    } catch (err) {
      if (err instanceof TransientLoadError) {
        r.state = "unloaded";
        r.error = err.cause instanceof Error ? err.cause.message : err.message;
        warn(`model version ${r.key} not loaded: ${r.error}`);
        throw err;
      }
      r.state = "failed";
      r.error = (err as Error).message;
      warn(`model version ${r.key} failed: ${r.error}`);
      this.opts.events.loadFailed(r.spec.id, r.spec.version, { start: t0, end: performance.now() }, r.error);
      throw failedError(r);
    }
  }

  private loadShape(r: VersionRecord) {
    const spec = r.spec;
    return {
      id: r.key,
      path: spec.path,
      // Command-line values override the models file, so one flag tunes every model.
      ctxSize: this.opts.ctxSize ?? spec.ctxSize,
      parallel: this.opts.parallel ?? spec.parallel ?? DEFAULT_PARALLEL,
      // Slot classes: --slots, else the models file's, unless --parallel/--ctx-size ask for one class.
      slots: this.opts.slots ?? (this.opts.parallel !== undefined || this.opts.ctxSize !== undefined ? undefined : spec.slots),
      flashAttention: this.opts.flashAttention,
      gpuLayers: spec.gpuLayers,
      embeddings: spec.embeddings !== undefined,
      speculative: this.speculationFor(spec.speculative),
      kvCacheTypes: { k: this.opts.cacheTypeK ?? spec.cacheTypeK ?? "f16", v: this.opts.cacheTypeV ?? spec.cacheTypeV ?? "f16" },
      mmap: this.opts.noMmap !== true && spec.mmap !== false,
    };
  }

  /** The command line's speculation over the models file's, with the command line's batch-size limit on either. */
  private speculationFor(fromFile: SpeculativeOptions | undefined): SpeculativeOptions | undefined {
    const s = this.opts.speculative ?? fromFile;
    const limit = this.opts.speculativeDisableByBatchSize;
    return s && limit !== undefined ? { ...s, disableByBatchSize: limit } : s;
  }

  private fits(need: MemoryFootprint): boolean {
    const used = this.used();
    const { ram, vram } = this.opts.budget;
    const count = this.resident().length;
    return used.ram + need.ram <= ram && used.vram + need.vram <= vram && (this.opts.maxLoaded === 0 || count < this.opts.maxLoaded);
  }

  /**
   * Evicts least recently used idle, unpinned versions until `r` fits. Busy ones are
   * waited for (bounded); a version larger than the whole budget fails at once.
   */
  private async makeRoom(r: VersionRecord, mayEvict: boolean): Promise<void> {
    const need = r.estimate!;
    const budget = this.opts.budget;
    if (need.ram > budget.ram || need.vram > budget.vram) {
      throw new Error(
        `needs ${formatBytes(need.ram)} RAM${need.vram > 0 ? ` and ${formatBytes(need.vram)} VRAM` : ""} (estimated), more than the whole memory budget ` +
          `(${formatBytes(budget.ram)} RAM${budget.vram !== Infinity ? `, ${formatBytes(budget.vram)} VRAM` : ""}); raise --memory-budget or lower ctx_size/parallel`,
      );
    }
    const giveUp = performance.now() + (this.opts.roomWaitMs ?? 30_000);
    while (!this.fits(need)) {
      const candidates = this.resident().filter((c) => !this.opts.isPinned(c.key));
      if (!mayEvict) throw new TransientLoadError("unavailable", `The model version '${r.key}' does not fit beside the resident ones.`, { code: "insufficient_memory", retryAfter: 5 });
      if (candidates.length === 0) {
        throw new TransientLoadError("unavailable", `The model version '${r.key}' does not fit beside the pinned versions (${this.residentKeys().join(", ")}).`, {
          code: "insufficient_memory",
          retryAfter: 30,
        });
      }
      const idle = candidates.filter((c) => c.state === "ready" && c.active === 0 && c.loaded!.scheduler.busySlots === 0 && c.loaded!.scheduler.waiting === 0);
      idle.sort((a, b) => a.lastUsed - b.lastUsed);
      const victim = idle[0];
      if (victim) {
        await this.evict(victim, "lru");
        continue;
      }
      const left = giveUp - performance.now();
      if (left <= 0) {
        throw new TransientLoadError("unavailable", `The model version '${r.key}' needs memory that busy versions hold (${candidates.map((c) => c.key).join(", ")}); try again shortly.`, {
          code: "insufficient_memory",
          retryAfter: 5,
        });
      }
      await this.nextChange(Math.min(left, 1000));
    }
  }

  private async loadInto(r: VersionRecord, t0: number): Promise<void> {
    const shape = this.loadShape(r);
    const { id, version } = r.spec;
    const steps = new StepTracker(this.opts.events.schedulerObserver(id, version), this.opts.schedulerDelayFactor ?? 0, this.engine.loneSteps === "js-thread");
    const tLoad = performance.now();
    const engineModel = await this.engine.loadModel({
      ...shape,
      threads: r.spec.threads ?? this.opts.threads,
      chatTemplate: this.opts.chatTemplate ?? r.spec.chatTemplate,
      observer: steps,
      faults: this.opts.faults,
      warn: (m) => this.opts.log.warn(m),
    });
    const scheduler = new Scheduler(engineModel, steps, { maxQueue: this.opts.maxQueue, maxQueuedTokens: this.opts.maxQueuedTokens });
    r.loaded = { key: r.key, id, version, spec: r.spec, engine: engineModel, scheduler };
    r.actual = engineModel.memoryUsage;
    const t1 = performance.now();
    r.loadSeconds = (t1 - tLoad) / 1000;
    try {
      await warmUp(r.loaded, r.warmup);
    } catch (err) {
      await this.release(r);
      throw err;
    }
    const t2 = performance.now();
    r.warmupSeconds = (t2 - t1) / 1000;
    r.readySeconds = (t2 - t0) / 1000;
    r.loads++;
    r.everReady = true;
    r.lastUsed = performance.now();
    r.created = Math.floor(Date.now() / 1000);
    r.state = "ready";
    r.error = undefined;
    this.opts.events.loaded(id, version, { loadStart: tLoad, loadEnd: t1, warmupEnd: t2 });
    this.opts.onReady?.(r.spec);
    const u = this.used();
    this.opts.log.info(
      `model ${r.key} ready: ${engineModel.slotClasses.map((c) => `${c.count} slots x ${c.ctxSize} tokens`).join(" + ")}, template ${engineModel.templateName}, ` +
        `memory ${formatBytes(r.actual.ram)} (estimated ${formatBytes(r.estimate!.ram)}), load ${r.loadSeconds.toFixed(2)}s, ` +
        `warmup ${r.warmupSeconds.toFixed(3)}s; resident ${formatBytes(u.ram)} of ${formatBytes(this.opts.budget.ram)}`,
    );
  }

  /** Frees a version's memory. Callers hold the exclusive queue. */
  private async release(r: VersionRecord): Promise<void> {
    const loaded = r.loaded;
    loaded?.scheduler.close();
    r.loaded = undefined;
    r.actual = undefined;
    // Estimates stay: the next load of this version needs no GGUF read.
    await loaded?.engine.dispose();
    this.wake();
  }

  private async evict(r: VersionRecord, reason: EvictionReason): Promise<void> {
    r.state = "unloading";
    const idleFor = (performance.now() - r.lastUsed) / 1000;
    await this.release(r);
    r.evictions++;
    if (r.state === "unloading") r.state = "unloaded";
    this.opts.events.evicted(r.spec.id, r.spec.version, reason);
    this.opts.log.info(`model ${r.key} unloaded (${reason === "lru" ? `least recently used, idle ${idleFor.toFixed(1)}s` : "by an operator"})`);
  }

  /** An operator's unload: refused for pinned versions, waits (bounded) for running requests. */
  async unload(key: string, waitMs: number): Promise<void> {
    const r = this.record(key);
    if (this.opts.isPinned(key)) throw new ApiError("conflict", `${key} is pinned: it is never unloaded.`, { code: "model_pinned" });
    await this.exclusive(async () => {
      const giveUp = performance.now() + waitMs;
      while (r.state === "ready" && r.active > 0) {
        if (performance.now() >= giveUp) throw new ApiError("conflict", `${key} is serving ${r.active} request(s); try again when it is idle.`, { code: "model_busy" });
        await this.nextChange(giveUp - performance.now());
      }
      if (r.state === "ready") await this.evict(r, "admin");
    });
  }

  /** Clears a failure so the version may be loaded again (an operator fixed the artifact). */
  retry(key: string): void {
    const r = this.record(key);
    if (r.state === "failed") {
      r.state = "unloaded";
      r.error = undefined;
    }
  }

  async disposeAll(): Promise<void> {
    await this.exclusive(async () => {
      for (const r of this.records.values()) {
        if (r.loaded) await this.release(r);
        if (r.state !== "failed") r.state = "unloaded";
      }
    });
  }
}

/** setTimeout's delay is a signed 32-bit number of milliseconds: longer waits fire at once. */
export function clampTimer(ms: number): number {
  return Math.min(Math.max(0, ms), 2 ** 31 - 1);
}

/** What a client learns of a failed version: that it failed, never why (paths, URLs, file bytes stay in the log and /admin/status). */
function failedError(r: VersionRecord): ApiError {
  return new ApiError("unavailable", `The model version '${r.key}' failed to load; its operator can see why in the server log or GET /admin/status.`, {
    code: "model_failed",
    retryAfter: 60,
  });
}

/** A short real generation through the scheduler: the version is ready only once this works. */
async function warmUp(model: LoadedModel, fixture: WarmupFixture): Promise<void> {
  const outcome = await model.scheduler.submit(
    {
      promptTokens: model.engine.tokenizePrompt(fixture.prompt),
      maxTokens: fixture.maxTokens,
      stop: [],
      sampling: GREEDY_SAMPLING,
      priority: "normal",
      deadline: performance.now() + 60_000,
      signal: new AbortController().signal,
      timeline: {},
    },
    { onStart() {}, onText() {} },
  );
  if ("error" in outcome) throw new Error(`warmup failed: ${outcome.error.message}`);
}
