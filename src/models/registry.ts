/**
 * The registry joins the repository (names → immutable versions) and residency (what is
 * in memory): it turns a requested name into a lease on a ready version, and carries out
 * operators' changes so that each is atomic for traffic — a pointer moves only after its
 * new target is loaded and warmed, and requests in flight keep the version they started
 * on (they hold a lease on it).
 */
import type { ModelConfig, RepositoryConfig, TrafficSplit } from "../config/models-file.js";
import type { LoadPolicy } from "../config/options.js";
import type { Engine } from "../engine/engine.js";
import { ModelLoadError } from "../engine/types.js";
import { ApiError } from "../errors.js";
import type { ResidencySnapshot, VersionSnapshot } from "../observers.js";
import { Repository, refKey, type Route, type VersionRef } from "./repository.js";
import type { StateFile } from "./repository-state.js";
import { Residency, type Lease, type LoadedModel, type ResidencyOptions } from "./residency.js";

export type { Lease, LoadedModel } from "./residency.js";
export type { VersionRef } from "./repository.js";

/** Residency's options (the registry decides what is pinned) plus where operators' changes are kept. */
export type RegistryOptions = Omit<ResidencyOptions, "isPinned" | "onReady"> & {
  stateFile: StateFile | undefined;
  /** Which requests may make a version load (--load-on-demand); operators' changes always may. */
  loadPolicy: LoadPolicy;
};

export interface Acquired {
  lease: Lease;
  via: Route["via"];
  /** A lease on the shadow version when the route mirrors this request and that version is ready. */
  shadow: Lease | undefined;
}

/** How long an operator's change may wait for its target version to load. */
const ADMIN_WAIT_MS = 120_000;

export class ModelRegistry {
  readonly repository: Repository;
  private readonly residency: Residency;
  private started = false;

  constructor(engine: Engine, config: RepositoryConfig, private readonly opts: RegistryOptions) {
    this.repository = new Repository(config, opts.stateFile, (m) => opts.log.warn(m));
    this.residency = new Residency(engine, { ...opts, isPinned: (key) => this.isPinned(key), onReady: (spec) => this.repository.recordServed(spec) });
    for (const m of config.models) {
      for (const v of m.versions) this.residency.add(v, m.warmup, this.repository.violations.get(refKey(v)));
    }
    for (const [key, why] of this.repository.violations) opts.log.warn(`model version ${key} refused: ${why}`);
  }

  models(): ModelConfig[] {
    return [...this.repository.models.values()];
  }

  /** One version as it is now. */
  version(ref: VersionRef): VersionSnapshot {
    return this.residency.snapshot(refKey(ref));
  }

  /** The version a bare model id serves now. */
  current(id: string): VersionSnapshot {
    return this.version(this.repository.current(id));
  }

  /** Budget, use and every version: what metrics and the admin routes read. */
  snapshot(): ResidencySnapshot {
    return { budget: this.residency.budget, used: this.residency.used(), versions: this.residency.snapshots() };
  }

  /** A version's engine and scheduler while it is in memory (inspection and tests; requests take a lease). */
  loaded(ref: VersionRef): LoadedModel | undefined {
    return this.residency.loaded(refKey(ref));
  }

  residentKeys(): string[] {
    return this.residency.residentKeys();
  }

  private isPinned(key: string): boolean {
    const at = key.lastIndexOf("@");
    const id = key.slice(0, at);
    const m = this.repository.models.get(id);
    return m !== undefined && m.pinned && refKey(this.repository.current(id)) === key;
  }

  /** The models whose version must be servable for the server to be ready: every pinned one, and the first listed. */
  requiredModels(): ModelConfig[] {
    return this.models().filter((m, i) => m.pinned || i === 0);
  }

  /**
   * Ready means: start-up finished, every pinned model's current version is loaded and
   * warmed, and the default (first) model's current version is loaded and warmed, or was
   * and has been evicted to make room (it loads again on demand).
   */
  get ready(): boolean {
    if (!this.started) return false;
    return this.requiredModels().every((m) => {
      const e = this.current(m.id);
      return e.state === "ready" || (!m.pinned && e.everReady && e.state !== "failed");
    });
  }

  /** The version a name serves now, when it is in memory (inspection and tests; requests take a lease instead). */
  resolve(name: string): LoadedModel {
    const key = refKey(this.repository.route(name, undefined).primary);
    const loaded = this.residency.state(key) === "ready" ? this.residency.loaded(key) : undefined;
    if (!loaded) throw new ApiError("unavailable", `The model version '${key}' is ${this.residency.state(key)}.`, { code: "model_not_ready", retryAfter: 5 });
    return loaded;
  }

  /** Routes `name` and leases the version that serves it, loading it when needed (bounded by the deadline). */
  async acquire(name: string, user: string | undefined, deadline: number, signal?: AbortSignal): Promise<Acquired> {
    const route = this.repository.route(name, user);
    const policy = this.opts.loadPolicy;
    const mayLoad = policy === "any" || (policy === "ids" && route.via !== "exact");
    const lease = await this.residency.acquire(refKey(route.primary), deadline, signal, { mayLoad });
    let shadow: Lease | undefined;
    if (route.shadow) {
      // Mirrored traffic never loads or evicts anything: it runs only where its version is ready.
      shadow = this.residency.tryAcquire(refKey(route.shadow));
      if (!shadow) this.opts.events.shadow(route.shadow.id, route.shadow.version, "skipped_not_ready");
    }
    return { lease, via: route.via, shadow };
  }

  /**
   * Loads each model's current version, pinned ones first, then the others in file order
   * while they fit without evicting anything. A version that fails is marked failed
   * (visible in /v1/models) and the others keep going; only when every one fails does
   * start-up fail.
   */
  async start(): Promise<void> {
    const models = this.models();
    const order = [...models.filter((m) => m.pinned), ...models.filter((m) => !m.pinned)];
    for (const m of order) {
      const key = refKey(this.repository.current(m.id));
      if (this.residency.state(key) === "failed") continue;
      try {
        const lease = await this.residency.acquire(key, performance.now() + 3_600_000, undefined, { mayEvict: m.pinned, quiet: true });
        lease.release();
      } catch {
        // Reported below, once, with the operator's reason.
      }
    }
    const targets = order.map((m) => this.current(m.id));
    const why = (e: VersionSnapshot) => e.error ?? `model "${e.key}": ${e.state}`;
    // Nothing servable at all: fail the start, with every reason, rather than serve nothing.
    if (!targets.some((e) => e.state === "ready")) throw new ModelLoadError(targets.map(why).join("; "));
    for (const e of targets) {
      if (e.state === "ready") continue;
      if (e.state === "failed") this.opts.log.warn(`model ${e.key} failed at start: ${why(e)}`);
      else this.opts.log.info(`model ${e.key} not loaded at start (it loads on demand): ${why(e)}`);
    }
    this.started = true;
  }

  /** Makes `target` ready (holding it so it cannot be evicted meanwhile), then runs the change. */
  private async withReady<T>(target: VersionRef, change: () => T): Promise<T> {
    const lease = await this.residency.acquire(refKey(target), performance.now() + ADMIN_WAIT_MS);
    try {
      return change();
    } finally {
      lease.release();
    }
  }

  private changed(name: string, action: string): void {
    this.opts.events.repositoryChange(name, action);
  }

  /** One operator's change at a time per name: a second waits for the first, then sees its result. */
  private readonly changing = new Map<string, Promise<unknown>>();

  private serialized<T>(name: string, change: () => Promise<T>): Promise<T> {
    const before = this.changing.get(name) ?? Promise.resolve();
    const run = before.then(change, change);
    const tail = run.catch(() => {});
    this.changing.set(name, tail);
    void tail.then(() => {
      if (this.changing.get(name) === tail) this.changing.delete(name);
    });
    return run;
  }

  /**
   * Each change is prepared (its target made ready) and then applied only if the pointer
   * is still what it was when the change was prepared (compare and set; 409 otherwise).
   */
  promote(name: string, version: string): Promise<{ from: VersionRef | undefined; to: VersionRef }> {
    return this.serialized(name, () => this.promoteNow(name, version));
  }

  private async promoteNow(name: string, version: string): Promise<{ from: VersionRef | undefined; to: VersionRef }> {
    const target = this.repository.promotionTarget(name, version);
    const expected = this.repository.pointerTarget(name) ?? null;
    const result = await this.withReady(target, () => this.repository.promote(name, target, expected));
    this.changed(name, "promote");
    this.opts.log.info(`${name} promoted: ${result.from ? refKey(result.from) : "(new)"} -> ${refKey(result.to)}`);
    return result;
  }

  rollback(name: string): Promise<{ from: VersionRef; to: VersionRef }> {
    return this.serialized(name, () => this.rollbackNow(name));
  }

  private async rollbackNow(name: string): Promise<{ from: VersionRef; to: VersionRef }> {
    const target = this.repository.rollbackTarget(name);
    const from = this.repository.pointerTarget(name)!;
    const result = await this.withReady(target, () => this.repository.rollback(name, { from, to: target }));
    this.changed(name, "rollback");
    this.opts.log.info(`${name} rolled back: ${refKey(result.from)} -> ${refKey(result.to)}`);
    return result;
  }

  setTraffic(id: string, kind: "canary" | "shadow", split: TrafficSplit | undefined): Promise<void> {
    return this.serialized(id, () => this.setTrafficNow(id, kind, split));
  }

  private async setTrafficNow(id: string, kind: "canary" | "shadow", split: TrafficSplit | undefined): Promise<void> {
    const target = this.repository.trafficTarget(id, split && split.weight > 0 ? split.version : undefined);
    if (target) {
      await this.withReady(target, () => this.repository.setTraffic(id, kind, split));
    } else {
      this.repository.setTraffic(id, kind, undefined);
    }
    this.changed(id, kind);
    this.opts.log.info(`${id} ${kind}: ${split && split.weight > 0 ? `${split.weight * 100}% to ${id}@${split.version}` : "off"}`);
  }

  private known(ref: VersionRef): string {
    if (!this.repository.exists(ref)) throw new ApiError("not_found", `No version ${refKey(ref)} in the models file.`, { code: "model_not_found" });
    return refKey(ref);
  }

  async load(ref: VersionRef): Promise<VersionSnapshot> {
    const key = this.known(ref);
    const violation = this.repository.violations.get(key);
    if (violation !== undefined) throw new ApiError("conflict", violation, { code: "version_immutable" });
    // An explicit load is how an operator retries a version that failed.
    this.residency.retry(key);
    await this.withReady(ref, () => undefined);
    return this.version(ref);
  }

  async unload(ref: VersionRef): Promise<VersionSnapshot> {
    const key = this.known(ref);
    await this.residency.unload(key, 30_000);
    return this.version(ref);
  }

  /**
   * Stops taking work (queued requests get 503), lets running generations finish for
   * up to `graceMs`, then ends the rest with a clear error.
   */
  async drain(graceMs: number): Promise<void> {
    const schedulers = this.residency.schedulers();
    for (const s of schedulers) s.close();
    const idle = await Promise.all(schedulers.map((s) => s.idle(graceMs)));
    if (idle.every(Boolean)) return;
    const ended = new ApiError("unavailable", "The server is shutting down: the generation was ended after the shutdown grace period.", { code: "shutting_down", retryAfter: 5 });
    for (const s of schedulers) s.terminate(ended);
    await Promise.all(schedulers.map((s) => s.idle(5000)));
  }

  async dispose(): Promise<void> {
    await this.residency.disposeAll();
  }
}
