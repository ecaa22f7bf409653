/**
 * The model repository: which immutable version a name means right now.
 *
 * A request names a model id (served by the id's current version, with its canary and
 * shadow policy applied), an alias (a named pointer to one id@version), or an exact
 * id@version. The id's current version and every alias are "pointers" with a history,
 * so promotion and rollback are one operation for both. Nothing here loads anything:
 * residency (src/models/residency.ts) makes versions ready; the registry makes a
 * pointer move only once its new target is ready.
 */
import { ApiError } from "../errors.js";
import { isValidName, splitVersioned, type ModelConfig, type ModelSpec, type RepositoryConfig, type TrafficSplit } from "../config/models-file.js";
import { emptyState, type RepositoryState, type StateFile } from "./repository-state.js";

export interface VersionRef {
  id: string;
  version: string;
}

export const refKey = (r: VersionRef): string => `${r.id}@${r.version}`;

export interface Route {
  primary: VersionRef;
  /** How the name was resolved: metrics and logs say which policy served it. */
  via: "id" | "canary" | "alias" | "exact";
  /** A version that gets a mirrored copy of the request, its output discarded. */
  shadow: VersionRef | undefined;
}

interface Pointer {
  target: VersionRef;
  /** Earlier targets, most recent last: rollback pops. */
  history: VersionRef[];
}

interface Traffic {
  canary: TrafficSplit | undefined;
  shadow: TrafficSplit | undefined;
}

/** How many earlier targets a pointer remembers. */
const HISTORY_LIMIT = 20;

/** FNV-1a over a string, as a fraction in [0, 1): sticky canary buckets per user. */
function bucket(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0) / 2 ** 32;
}

export class Repository {
  readonly models: ReadonlyMap<string, ModelConfig>;
  private readonly pointers = new Map<string, Pointer>();
  private readonly traffic = new Map<string, Traffic>();
  /** Pointers and traffic policies an operator has set: only these are saved, so the models file's defaults stay in charge of the rest. */
  private readonly operated = new Set<string>();
  private readonly operatedTraffic = new Set<string>();
  /** "id@version" -> why the version may not be served (its artifact changed under its name). */
  readonly violations = new Map<string, string>();
  private state: RepositoryState;

  constructor(
    config: RepositoryConfig,
    private readonly file: StateFile | undefined,
    private readonly log: (msg: string) => void,
  ) {
    this.models = new Map(config.models.map((m) => [m.id, m]));
    this.state = file ? file.read() : emptyState();
    for (const name of file?.cleanStale() ?? []) this.log(`repository state: removed ${name}, left by a process that stopped while saving`);
    for (const m of config.models) {
      this.pointers.set(m.id, { target: { id: m.id, version: m.defaultVersion }, history: [] });
      this.traffic.set(m.id, { canary: m.canary, shadow: m.shadow });
    }
    for (const [alias, target] of Object.entries(config.aliases)) this.pointers.set(alias, { target, history: [] });
    this.applySavedState();
    this.checkImmutability();
  }

  /** Saved promotions and weights win over the file's defaults, unless they name what no longer exists. */
  private applySavedState(): void {
    for (const [name, saved] of Object.entries(this.state.pointers)) {
      if (!this.pointers.has(name) && this.models.has(name)) continue;
      if (!this.pointers.has(name) && !isValidName(name)) {
        this.log(`repository state: ignoring the alias ${JSON.stringify(name)}: not a valid name`);
        continue;
      }
      if (!this.exists(saved.target)) {
        this.log(`repository state: ignoring "${name}" -> ${refKey(saved.target)}: that version is no longer in the models file`);
        continue;
      }
      const before = this.pointers.get(name)?.target;
      if (before && refKey(before) !== refKey(saved.target)) this.log(`repository state: "${name}" serves ${refKey(saved.target)} (set by an operator; the models file says ${refKey(before)})`);
      // An alias created at run time survives restarts as well.
      this.pointers.set(name, { target: saved.target, history: saved.history.filter((r) => this.exists(r)) });
      this.operated.add(name);
    }
    for (const [id, saved] of Object.entries(this.state.traffic)) {
      const t = this.traffic.get(id);
      if (!t) continue;
      const ok = (s: TrafficSplit | null | undefined) => s === undefined || s === null || this.exists({ id, version: s.version });
      if (!ok(saved.canary) || !ok(saved.shadow)) {
        this.log(`repository state: ignoring the traffic policy of "${id}": it names a version no longer in the models file`);
        continue;
      }
      if (saved.canary !== undefined) t.canary = saved.canary ?? undefined;
      if (saved.shadow !== undefined) t.shadow = saved.shadow ?? undefined;
      this.operatedTraffic.add(id);
    }
  }

  /**
   * A version is the artifact it was first served with. A models file that gives a served
   * version another hash is refused for that version (the others keep serving); the fix
   * is a new version name. A version never served yet may still have its hash corrected.
   */
  private checkImmutability(): void {
    for (const m of this.models.values()) {
      for (const v of m.versions) {
        if (v.sha256 === undefined) continue;
        const key = refKey(v);
        const seen = this.state.artifacts[key];
        if (seen !== undefined && seen !== v.sha256) {
          this.violations.set(
            key,
            `version ${key} is immutable: it was served with sha256 ${seen}, and the models file now gives ${v.sha256}. Give the new artifact a new version name.`,
          );
        }
      }
    }
  }

  /** Records the hash a version is served with, the first time it becomes ready (the immutability rule's evidence). */
  recordServed(ref: VersionRef): void {
    const v = this.spec(ref);
    const key = refKey(ref);
    if (v?.sha256 === undefined || this.state.artifacts[key] !== undefined) return;
    this.state.artifacts[key] = v.sha256;
    try {
      this.save();
    } catch (err) {
      // Serving goes on; what cannot be recorded is this version's first hash (operators' changes are then refused with the reason).
      this.log(`repository state: cannot write ${this.file?.path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  }

  private save(): void {
    if (!this.file) return;
    const pointers: RepositoryState["pointers"] = {};
    for (const name of this.operated) {
      const p = this.pointers.get(name);
      if (p) pointers[name] = { target: p.target, history: p.history };
    }
    const traffic: RepositoryState["traffic"] = {};
    for (const id of this.operatedTraffic) {
      const t = this.traffic.get(id)!;
      traffic[id] = { canary: t.canary ?? null, shadow: t.shadow ?? null };
    }
    this.file.write({ ...this.state, pointers, traffic });
  }

  exists(ref: VersionRef): boolean {
    return this.models.get(ref.id)?.versions.some((v) => v.version === ref.version) ?? false;
  }

  spec(ref: VersionRef): ModelSpec | undefined {
    return this.models.get(ref.id)?.versions.find((v) => v.version === ref.version);
  }

  /** What a pointer (model id or alias) serves now; undefined for a name that is neither. */
  pointerTarget(name: string): VersionRef | undefined {
    return this.pointers.get(name)?.target;
  }

  /** The version a model id serves when no canary applies. */
  current(id: string): VersionRef {
    return this.pointers.get(id)!.target;
  }

  aliases(): Array<{ alias: string; target: VersionRef }> {
    const out: Array<{ alias: string; target: VersionRef }> = [];
    for (const [name, p] of this.pointers) if (!this.models.has(name)) out.push({ alias: name, target: p.target });
    return out;
  }

  trafficOf(id: string): Traffic {
    return this.traffic.get(id)!;
  }

  isAlias(name: string): boolean {
    return this.pointers.has(name) && !this.models.has(name);
  }

  /**
   * What serves a request for `name`. Canary: a `user` always lands on the same side
   * (a hash of user and id against the weight); anonymous requests draw at random.
   */
  route(name: string, user: string | undefined): Route {
    const model = this.models.get(name);
    if (model) {
      const t = this.traffic.get(name)!;
      let primary = this.pointers.get(name)!.target;
      let via: Route["via"] = "id";
      if (t.canary && t.canary.weight > 0 && t.canary.version !== primary.version) {
        const draw = user !== undefined && user !== "" ? bucket(`${name}\u0000${user}`) : Math.random();
        if (draw < t.canary.weight) {
          primary = { id: name, version: t.canary.version };
          via = "canary";
        }
      }
      const shadow = t.shadow && t.shadow.weight > 0 && t.shadow.version !== primary.version && Math.random() < t.shadow.weight ? { id: name, version: t.shadow.version } : undefined;
      return { primary, via, shadow };
    }
    const alias = this.pointers.get(name);
    if (alias) return { primary: alias.target, via: "alias", shadow: undefined };
    const exact = splitVersioned(name);
    if (exact && this.exists(exact)) return { primary: exact, via: "exact", shadow: undefined };
    if (exact && this.models.has(exact.id)) {
      const known = this.models.get(exact.id)!.versions.map((v) => v.version).join(", ");
      throw new ApiError("not_found", `The model '${exact.id}' has no version '${exact.version}' (versions: ${known}).`, { param: "model", code: "model_not_found" });
    }
    throw new ApiError("not_found", `The model '${name}' does not exist.`, { param: "model", code: "model_not_found" });
  }

  /** The pointer an admin call names: a model id or an alias, else 404. */
  private pointer(name: string): Pointer {
    const p = this.pointers.get(name);
    if (!p) throw new ApiError("not_found", `No model id or alias named '${name}'.`, { code: "model_not_found" });
    return p;
  }

  /** What a promotion of `name` to `version` would serve: checks that it exists and is another version. */
  promotionTarget(name: string, version: string): VersionRef {
    const p = this.pointers.get(name);
    // A new alias obeys the models file's name rules: no '@' (it would shadow an exact id@version), no control or bidi characters.
    if (!p && !isValidName(name)) {
      throw new ApiError("invalid_request", `Invalid alias name: letters, digits, '.', '_', ':' and '-', starting with a letter or digit, at most 128 characters.`, {
        param: "name",
        code: "invalid_name",
      });
    }
    const ref = splitVersioned(version) ?? { id: p?.target.id ?? name, version };
    if (!this.exists(ref)) throw new ApiError("not_found", `No version ${refKey(ref)} in the models file.`, { param: "version", code: "model_not_found" });
    if (this.models.has(name) && ref.id !== name) {
      throw new ApiError("invalid_request", `Model '${name}' can only serve its own versions, not ${refKey(ref)}.`, { param: "version", code: "invalid_value" });
    }
    return ref;
  }

  /**
   * Moves (or creates) a pointer; the caller has made the target ready. `expected` is what
   * the pointer served when the change was prepared: if it moved meanwhile, 409 (compare
   * and set). Saved before it takes effect.
   */
  promote(name: string, target: VersionRef, expected?: VersionRef | null): { from: VersionRef | undefined; to: VersionRef } {
    const p = this.pointers.get(name);
    const from = p?.target;
    if (expected !== undefined) this.unchanged(name, from, expected);
    const next: Pointer = p ? { target, history: [...p.history, p.target].slice(-HISTORY_LIMIT) } : { target, history: [] };
    if (from && refKey(from) === refKey(target)) return { from, to: target };
    this.commit(this.operated, name, () => this.pointers.set(name, next), () => (p ? this.pointers.set(name, p) : this.pointers.delete(name)));
    return { from, to: target };
  }

  /** What a rollback of `name` would serve: its previous target. */
  rollbackTarget(name: string): VersionRef {
    const p = this.pointer(name);
    const prev = p.history[p.history.length - 1];
    if (!prev) throw new ApiError("conflict", `'${name}' has no earlier version to roll back to.`, { code: "no_history" });
    return prev;
  }

  /** Rolls back to `expectedTo` from `expectedFrom`, as prepared; 409 if the pointer or its history moved meanwhile. */
  rollback(name: string, expected?: { from: VersionRef; to: VersionRef }): { from: VersionRef; to: VersionRef } {
    const p = this.pointer(name);
    const to = this.rollbackTarget(name);
    if (expected) {
      this.unchanged(name, p.target, expected.from);
      if (refKey(to) !== refKey(expected.to)) throw moved(name);
    }
    const next: Pointer = { target: to, history: p.history.slice(0, -1) };
    this.commit(this.operated, name, () => this.pointers.set(name, next), () => this.pointers.set(name, p));
    return { from: p.target, to };
  }

  private unchanged(name: string, actual: VersionRef | undefined, expected: VersionRef | null): void {
    if ((actual ? refKey(actual) : null) !== (expected ? refKey(expected) : null)) throw moved(name);
  }

  /** The version a canary or shadow of model `id` would send traffic to: checks that both exist. */
  trafficTarget(id: string, version: string | undefined): VersionRef | undefined {
    if (!this.traffic.has(id)) throw new ApiError("not_found", `The model '${id}' does not exist.`, { code: "model_not_found" });
    if (version === undefined) return undefined;
    if (!this.exists({ id, version })) throw new ApiError("not_found", `No version ${id}@${version} in the models file.`, { param: "version", code: "model_not_found" });
    return { id, version };
  }

  setTraffic(id: string, kind: "canary" | "shadow", split: TrafficSplit | undefined): void {
    this.trafficTarget(id, split?.version);
    const t = this.traffic.get(id)!;
    const before = t[kind];
    this.commit(this.operatedTraffic, id, () => (t[kind] = split), () => (t[kind] = before));
  }

  /** Applies a change, marks `key` as an operator's (so it is saved), saves, and undoes both when the state file cannot be written. */
  private commit(operated: Set<string>, key: string, apply: () => void, undo: () => void): void {
    const wasOperated = operated.has(key);
    operated.add(key);
    apply();
    try {
      this.save();
    } catch (err) {
      undo();
      if (!wasOperated) operated.delete(key);
      throw new ApiError("internal", `The change was not made: the repository state could not be saved (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}).`, { code: "state_not_saved" });
    }
  }
}

function moved(name: string): ApiError {
  return new ApiError("conflict", `'${name}' changed while this change was being prepared; read its state and try again.`, { code: "concurrent_change" });
}
