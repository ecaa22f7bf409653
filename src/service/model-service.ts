/**
 * What the routes about models need, and nothing more: read-only views of the catalog
 * (ids, aliases, versions, what each serves and costs), readiness, and the operators'
 * changes, carried out by the registry. The HTTP layer talks to this, never to the
 * registry or residency themselves.
 */
import { mayUse, type Principal } from "../access/keys.js";
import type { TrafficSplit } from "../config/models-file.js";
import { splitVersioned } from "../config/models-file.js";
import { ApiError } from "../errors.js";
import type { ModelRegistry } from "../models/registry.js";
import { refKey } from "../models/repository.js";
import type { ResidencySnapshot, VersionSnapshot } from "../observers.js";

export interface ModelView {
  kind: "model";
  id: string;
  /** The version the bare id serves now. */
  current: VersionSnapshot;
  pinned: boolean;
  versions: VersionSnapshot[];
  canary: TrafficSplit | null;
  shadow: TrafficSplit | null;
}

export interface AliasView {
  kind: "alias";
  id: string;
  target: VersionSnapshot;
}

export interface VersionView {
  kind: "version";
  snapshot: VersionSnapshot;
}

export type CatalogEntry = ModelView | AliasView | VersionView;

export interface Readiness {
  ready: boolean;
  accepting: boolean;
  models: Array<{ id: string; version: string; state: string; pinned: boolean; error: string | undefined }>;
}

export class ModelService {
  constructor(
    private readonly registry: ModelRegistry,
    private readonly isAccepting: () => boolean,
  ) {}

  private modelView(id: string): ModelView {
    const r = this.registry;
    const config = r.repository.models.get(id)!;
    const traffic = r.repository.trafficOf(id);
    return {
      kind: "model",
      id,
      current: r.current(id),
      pinned: config.pinned,
      versions: config.versions.map((v) => r.version(v)),
      canary: traffic.canary ?? null,
      shadow: traffic.shadow ?? null,
    };
  }

  private aliasView(alias: string): AliasView {
    const target = this.registry.repository.aliases().find((a) => a.alias === alias)!.target;
    return { kind: "alias", id: alias, target: this.registry.version(target) };
  }

  /** Every model id and alias a tenant may use, each model with its versions. */
  catalog(principal?: Principal): { models: ModelView[]; aliases: AliasView[] } {
    const r = this.registry;
    return {
      models: r.models().filter((m) => mayUse(principal, m.id)).map((m) => this.modelView(m.id)),
      aliases: r.repository.aliases().filter((a) => mayUse(principal, a.alias)).map((a) => this.aliasView(a.alias)),
    };
  }

  /** One name: a model id, an alias, or an exact id@version; else 404. */
  find(name: string, principal?: Principal): CatalogEntry {
    const repo = this.registry.repository;
    if (mayUse(principal, name)) {
      if (repo.models.has(name)) return this.modelView(name);
      if (repo.isAlias(name)) return this.aliasView(name);
      const exact = splitVersioned(name);
      if (exact && repo.exists(exact)) return { kind: "version", snapshot: this.registry.version(exact) };
    }
    throw new ApiError("not_found", `The model '${name}' does not exist.`, { param: "model", code: "model_not_found" });
  }

  /**
   * The version a name means for the Open Inference Protocol routes: an id means its
   * current version (no canary draw), an alias its target; with `version`, that version
   * of the id (or of the alias's id).
   */
  oip(name: string, version?: string): { snapshot: VersionSnapshot; versions: string[] } {
    const repo = this.registry.repository;
    let id: string;
    if (repo.models.has(name)) id = name;
    else if (repo.isAlias(name)) id = repo.route(name, undefined).primary.id;
    else throw new ApiError("not_found", `The model '${name}' does not exist.`, { param: "model", code: "model_not_found" });
    const versions = repo.models.get(id)!.versions.map((v) => v.version);
    if (version === undefined) {
      const ref = repo.models.has(name) ? repo.current(name) : repo.route(name, undefined).primary;
      return { snapshot: this.registry.version(ref), versions };
    }
    if (!versions.includes(version)) throw new ApiError("not_found", `The model '${name}' has no version '${version}'.`, { param: "model", code: "model_not_found" });
    return { snapshot: this.registry.version({ id, version }), versions: [version] };
  }

  readiness(): Readiness {
    const accepting = this.isAccepting();
    return {
      accepting,
      ready: accepting && this.registry.ready,
      models: this.registry.requiredModels().map((m) => {
        const e = this.registry.current(m.id);
        return { id: m.id, version: e.version, state: e.state, pinned: m.pinned, error: e.error };
      }),
    };
  }

  /** The whole picture, for operators. */
  status(): { accepting: boolean; ready: boolean; residency: ResidencySnapshot; models: ModelView[]; aliases: Array<{ alias: string; target: string }> } {
    return {
      accepting: this.isAccepting(),
      ready: this.registry.ready,
      residency: this.registry.snapshot(),
      models: this.registry.models().map((m) => this.modelView(m.id)),
      aliases: this.registry.repository.aliases().map((a) => ({ alias: a.alias, target: refKey(a.target) })),
    };
  }

  async promote(name: string, version: string): Promise<{ from: string | null; to: string }> {
    const r = await this.registry.promote(name, version);
    return { from: r.from ? refKey(r.from) : null, to: refKey(r.to) };
  }

  async rollback(name: string): Promise<{ from: string; to: string }> {
    const r = await this.registry.rollback(name);
    return { from: refKey(r.from), to: refKey(r.to) };
  }

  async setTraffic(id: string, kind: "canary" | "shadow", split: TrafficSplit): Promise<ModelView> {
    await this.registry.setTraffic(id, kind, split.weight > 0 ? split : undefined);
    return this.modelView(id);
  }

  load(id: string, version: string): Promise<VersionSnapshot> {
    return this.registry.load({ id, version });
  }

  unload(id: string, version: string): Promise<VersionSnapshot> {
    return this.registry.unload({ id, version });
  }
}
