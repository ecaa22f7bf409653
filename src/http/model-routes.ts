/**
 * Routes about models rather than generations: the OpenAI model list, readiness (ours
 * and the Open Inference Protocol's /v2 routes), and the admin API that changes the
 * repository (promote, roll back, canary, shadow, load, unload). Each admin change is
 * carried out by the registry, which makes it atomic for traffic.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { z } from "zod";
import { ApiError } from "../errors.js";
import type { ModelEntry, ModelRegistry } from "../models/registry.js";
import { refKey } from "../models/repository.js";
import { parseBody } from "../protocol/common.js";

function schedulerJson(e: ModelEntry) {
  return e.scheduler
    ? {
        busy_slots: e.scheduler.busySlots,
        total_slots: e.scheduler.totalSlots,
        waiting: e.scheduler.waiting,
        // Decode steps, sequences in them, sequences running at them, tokens in them:
        // items / expected is how full the steps are.
        ...{ steps: e.scheduler.stats.steps, items: e.scheduler.stats.items, expected: e.scheduler.stats.expected, tokens: e.scheduler.stats.tokens },
      }
    : null;
}

/** One version as the model list shows it: what it is, whether it serves, what it costs. */
function versionJson(registry: ModelRegistry, e: ModelEntry) {
  return {
    id: e.key,
    object: "model" as const,
    created: e.created,
    owned_by: "spindle",
    kind: "version",
    model: e.id,
    version: e.version,
    state: e.state,
    error: e.error ?? null,
    pinned: registry.isPinned(e),
    sha256: e.spec.sha256 ?? null,
    license: e.spec.license ?? null,
    source: e.spec.source ?? null,
    memory: {
      estimated_bytes: e.estimate ?? null,
      allocated_bytes: e.actual ?? null,
    },
    load_seconds: e.loadSeconds ?? null,
    warmup_seconds: e.warmupSeconds ?? null,
    ready_seconds: e.readySeconds ?? null,
    loads: e.loads,
    evictions: e.evictions,
    active_requests: e.active,
    context_length: e.engine?.ctxSize ?? null,
    parallel: e.engine?.parallel ?? null,
    chat_template: e.engine?.templateName ?? null,
    scheduler: schedulerJson(e),
  };
}

/** A model id: what it serves now and its traffic policy. */
function modelJson(registry: ModelRegistry, id: string) {
  const current = registry.current(id);
  const config = registry.repository.models.get(id)!;
  const traffic = registry.repository.trafficOf(id);
  return {
    id,
    object: "model" as const,
    created: current.created,
    owned_by: "spindle",
    kind: "model",
    resolves_to: current.key,
    version: current.version,
    state: current.state,
    error: current.error ?? null,
    pinned: config.pinned,
    versions: config.versions.map((v) => v.version),
    canary: traffic.canary ?? null,
    shadow: traffic.shadow ?? null,
    context_length: current.engine?.ctxSize ?? null,
    parallel: current.engine?.parallel ?? null,
    chat_template: current.engine?.templateName ?? null,
    scheduler: schedulerJson(current),
  };
}

function aliasJson(registry: ModelRegistry, alias: string) {
  const target = registry.entry(registry.repository.aliases().find((a) => a.alias === alias)!.target);
  return {
    id: alias,
    object: "model" as const,
    created: target.created,
    owned_by: "spindle",
    kind: "alias",
    resolves_to: target.key,
    version: target.version,
    state: target.state,
    error: target.error ?? null,
  };
}

function listModels(registry: ModelRegistry) {
  return [
    ...registry.models().map((m) => modelJson(registry, m.id)),
    ...registry.repository.aliases().map((a) => aliasJson(registry, a.alias)),
    ...registry.list().map((e) => versionJson(registry, e)),
  ];
}

function findModel(registry: ModelRegistry, name: string) {
  if (registry.repository.models.has(name)) return modelJson(registry, name);
  if (registry.repository.isAlias(name)) return aliasJson(registry, name);
  const e = registry.list().find((x) => x.key === name);
  if (e) return versionJson(registry, e);
  throw new ApiError("not_found", `The model '${name}' does not exist.`, { param: "model", code: "model_not_found" });
}

const versionBody = z.strictObject({ version: z.string().min(1) });
const trafficBody = z.strictObject({ version: z.string().min(1), weight: z.number().min(0).max(1) });

export function registerModelRoutes(app: FastifyInstance, registry: ModelRegistry, isAccepting: () => boolean): void {
  app.get("/v1/models", async () => ({ object: "list", data: listModels(registry) }));
  app.get<{ Params: { id: string } }>("/v1/models/:id", async (request) => findModel(registry, request.params.id));

  // Liveness: the process serves HTTP. Readiness: loaded and warmed (see ModelRegistry.ready).
  const live = async () => ({ status: "ok", live: true });
  app.get("/livez", live);
  app.get("/v2/health/live", live);
  const ready = async (_req: FastifyRequest, reply: FastifyReply) => {
    const accepting = isAccepting();
    const ok = accepting && registry.ready;
    return reply.code(ok ? 200 : 503).send({
      status: ok ? "ready" : accepting ? "loading" : "shutting_down",
      ready: ok,
      models: registry.requiredModels().map((m) => {
        const e = registry.current(m.id);
        return { id: m.id, version: e.version, state: e.state, pinned: m.pinned, ...(e.error ? { error: e.error } : {}) };
      }),
    });
  };
  app.get("/readyz", ready);
  app.get("/health", ready);
  app.get("/v2/health/ready", ready);

  // Open Inference Protocol (KServe v2) model metadata and readiness, per model and per version.
  // An id means its current version (no canary draw); an alias, its target.
  const oipModel = (name: string) => {
    if (registry.repository.models.has(name)) return registry.current(name);
    if (registry.repository.isAlias(name)) return registry.entry(registry.repository.route(name, undefined).primary);
    throw new ApiError("not_found", `The model '${name}' does not exist.`, { param: "model", code: "model_not_found" });
  };
  const oipVersion = (name: string, version: string) => {
    const id = registry.repository.models.has(name) ? name : oipModel(name).id;
    const e = registry.list().find((x) => x.id === id && x.version === version);
    if (!e) throw new ApiError("not_found", `The model '${name}' has no version '${version}'.`, { param: "model", code: "model_not_found" });
    return e;
  };
  const metadata = (e: ModelEntry) => ({
    name: e.id,
    versions: registry.repository.models.get(e.id)!.versions.map((v) => v.version),
    platform: "llama.cpp_gguf",
    inputs: [{ name: "text_input", datatype: "BYTES", shape: [1] }],
    outputs: [{ name: "text_output", datatype: "BYTES", shape: [-1] }],
  });
  const readiness = (reply: FastifyReply, e: ModelEntry) => reply.code(e.state === "ready" ? 200 : 503).send({ name: e.id, version: e.version, ready: e.state === "ready", state: e.state });
  app.get<{ Params: { id: string } }>("/v2/models/:id", async (request) => metadata(oipModel(request.params.id)));
  app.get<{ Params: { id: string } }>("/v2/models/:id/ready", async (request, reply) => readiness(reply, oipModel(request.params.id)));
  app.get<{ Params: { id: string; v: string } }>("/v2/models/:id/versions/:v", async (request) => ({
    ...metadata(oipVersion(request.params.id, request.params.v)),
    versions: [request.params.v],
  }));
  app.get<{ Params: { id: string; v: string } }>("/v2/models/:id/versions/:v/ready", async (request, reply) => readiness(reply, oipVersion(request.params.id, request.params.v)));

  // Admin: protected by the admin key (or loopback-only) in app.ts's onRequest hook.
  app.get("/admin/status", async () => {
    const budget = registry.residency.budget;
    const used = registry.residency.used();
    return {
      accepting: isAccepting(),
      ready: registry.ready,
      memory: {
        budget_bytes: { ram: budget.ram, vram: Number.isFinite(budget.vram) ? budget.vram : null },
        resident_estimated_bytes: used,
      },
      models: registry.models().map((m) => modelJson(registry, m.id)),
      aliases: registry.repository.aliases().map((a) => ({ alias: a.alias, target: refKey(a.target) })),
      versions: registry.list().map((e) => versionJson(registry, e)),
    };
  });
  type Named = { Params: { name: string } };
  app.post<Named>("/admin/models/:name/promote", async (request) => {
    const { version } = parseBody(versionBody, request.body ?? {});
    const r = await registry.promote(request.params.name, version);
    return { name: request.params.name, from: r.from ? refKey(r.from) : null, to: refKey(r.to) };
  });
  app.post<Named>("/admin/models/:name/rollback", async (request) => {
    const r = await registry.rollback(request.params.name);
    return { name: request.params.name, from: refKey(r.from), to: refKey(r.to) };
  });
  for (const kind of ["canary", "shadow"] as const) {
    app.post<Named>(`/admin/models/:name/${kind}`, async (request) => {
      const split = parseBody(trafficBody, request.body ?? {});
      await registry.setTraffic(request.params.name, kind, split.weight > 0 ? split : undefined);
      return modelJson(registry, request.params.name);
    });
  }
  type Versioned = { Params: { name: string; version: string } };
  app.post<Versioned>("/admin/models/:name/versions/:version/load", async (request) => {
    const e = await registry.load({ id: request.params.name, version: request.params.version });
    return versionJson(registry, e);
  });
  app.post<Versioned>("/admin/models/:name/versions/:version/unload", async (request) => {
    const e = await registry.unload({ id: request.params.name, version: request.params.version });
    return versionJson(registry, e);
  });
}
