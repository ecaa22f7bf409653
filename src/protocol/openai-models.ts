/**
 * The model list in OpenAI's shape (`object: "model"`, `id`, `created`, `owned_by`), with
 * what Spindle adds: which version an id or alias resolves to, its state, and per
 * version what it costs and how it loaded.
 */
import type { SchedulerSnapshot, VersionSnapshot } from "../observers.js";
import type { AliasView, CatalogEntry, ModelView } from "../service/model-service.js";

function schedulerJson(s: SchedulerSnapshot | undefined) {
  return s
    ? {
        busy_slots: s.busySlots,
        total_slots: s.totalSlots,
        waiting: s.waiting,
        // Decode steps, sequences in them, sequences running at them, tokens in them:
        // items / expected is how full the steps are.
        steps: s.steps,
        items: s.items,
        expected: s.expected,
        tokens: s.tokens,
      }
    : null;
}

/** What a client may read of why a version is not serving: its state's code, never paths or URLs. */
function publicError(v: VersionSnapshot): string | null {
  if (v.error === undefined) return null;
  return v.state === "failed" ? "model_failed" : "model_unavailable";
}

export function versionJson(v: VersionSnapshot, detail: "public" | "operator" = "public") {
  return {
    id: v.key,
    object: "model" as const,
    created: v.created,
    owned_by: "spindle",
    kind: "version",
    model: v.id,
    version: v.version,
    state: v.state,
    error: detail === "operator" ? (v.error ?? null) : publicError(v),
    pinned: v.pinned,
    sha256: v.sha256 ?? null,
    license: v.license ?? null,
    source: v.source ?? null,
    memory: { estimated_bytes: v.estimate ?? null, allocated_bytes: v.actual ?? null },
    load_seconds: v.loadSeconds ?? null,
    warmup_seconds: v.warmupSeconds ?? null,
    ready_seconds: v.readySeconds ?? null,
    loads: v.loads,
    evictions: v.evictions,
    active_requests: v.active,
    context_length: v.loaded?.contextLength ?? null,
    parallel: v.loaded?.parallel ?? null,
    speculative: v.loaded?.speculative
      ? { ...v.loaded.speculative, acceptance_rate: v.loaded.speculative.accepted + v.loaded.speculative.rejected > 0 ? v.loaded.speculative.accepted / (v.loaded.speculative.accepted + v.loaded.speculative.rejected) : null }
      : null,
    slots: v.loaded ? v.loaded.slotClasses.map((c) => ({ count: c.count, context_length: c.ctxSize })) : null,
    chat_template: v.loaded?.chatTemplate ?? null,
    kv_cache_type: v.loaded?.kvCacheTypes ?? null,
    scheduler: schedulerJson(v.loaded?.scheduler),
  };
}

export function modelJson(m: ModelView, detail: "public" | "operator" = "public") {
  const c = m.current;
  return {
    id: m.id,
    object: "model" as const,
    created: c.created,
    owned_by: "spindle",
    kind: "model",
    resolves_to: c.key,
    version: c.version,
    state: c.state,
    error: detail === "operator" ? (c.error ?? null) : publicError(c),
    pinned: m.pinned,
    // Versions belong to their model (pickers list ids and aliases); each is reachable as id@version.
    versions: m.versions.map((v) => versionJson(v, detail)),
    canary: m.canary,
    shadow: m.shadow,
    context_length: c.loaded?.contextLength ?? null,
    parallel: c.loaded?.parallel ?? null,
    chat_template: c.loaded?.chatTemplate ?? null,
    scheduler: schedulerJson(c.loaded?.scheduler),
  };
}

export function aliasJson(a: AliasView) {
  const t = a.target;
  return {
    id: a.id,
    object: "model" as const,
    created: t.created,
    owned_by: "spindle",
    kind: "alias",
    resolves_to: t.key,
    version: t.version,
    state: t.state,
    error: publicError(t),
  };
}

/** One entry per model id and per alias: what clients' model pickers show. */
export function catalogJson(catalog: { models: ModelView[]; aliases: AliasView[] }) {
  return { object: "list" as const, data: [...catalog.models.map((m) => modelJson(m)), ...catalog.aliases.map(aliasJson)] };
}

export function entryJson(e: CatalogEntry) {
  if (e.kind === "model") return modelJson(e);
  if (e.kind === "alias") return aliasJson(e);
  return versionJson(e.snapshot);
}
