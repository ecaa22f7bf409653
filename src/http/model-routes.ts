/** The model list (OpenAI's /v1/models) and health: liveness, readiness, the Open Inference Protocol's /v2 routes. */
import type { FastifyInstance, FastifyReply } from "fastify";
import type { VersionSnapshot } from "../observers.js";
import { catalogJson, entryJson } from "../protocol/openai-models.js";
import type { ModelService } from "../service/model-service.js";

export function registerModelRoutes(app: FastifyInstance, models: ModelService): void {
  const api = { config: { area: "api" as const } };
  for (const prefix of ["/v1", ""]) {
    app.get(`${prefix}/models`, api, async (request) => catalogJson(models.catalog(request.principal)));
    app.get<{ Params: { id: string } }>(`${prefix}/models/:id`, api, async (request) => entryJson(models.find(request.params.id, request.principal)));
  }
}

export function registerHealthRoutes(app: FastifyInstance, models: ModelService): void {
  const health = { config: { area: "health" as const } };
  // Liveness: the process serves HTTP. Readiness: loaded and warmed (see ModelRegistry.ready).
  const live = async () => ({ status: "ok", live: true });
  app.get("/livez", health, live);
  app.get("/v2/health/live", health, live);
  const ready = async (_req: unknown, reply: FastifyReply) => {
    const r = models.readiness();
    return reply.code(r.ready ? 200 : 503).send({
      status: r.ready ? "ready" : r.accepting ? "loading" : "shutting_down",
      ready: r.ready,
      models: r.models.map((m) => ({ id: m.id, version: m.version, state: m.state, pinned: m.pinned })),
    });
  };
  app.get("/readyz", health, ready);
  app.get("/v2/health/ready", health, ready);
  // llama-server's body: {"status":"ok"} once ready (the detail is in /readyz).
  app.get("/health", health, async (_req, reply) => {
    const r = models.readiness();
    return reply.code(r.ready ? 200 : 503).send({ status: r.ready ? "ok" : r.accepting ? "loading" : "shutting_down" });
  });

  // Open Inference Protocol (KServe v2) model metadata and readiness, per model and per version.
  const metadata = (name: string, versions: string[]) => ({
    name,
    versions,
    platform: "llama.cpp_gguf",
    inputs: [{ name: "text_input", datatype: "BYTES", shape: [1] }],
    outputs: [{ name: "text_output", datatype: "BYTES", shape: [-1] }],
  });
  const readiness = (reply: FastifyReply, v: VersionSnapshot) => reply.code(v.state === "ready" ? 200 : 503).send({ name: v.id, version: v.version, ready: v.state === "ready", state: v.state });
  type Id = { Params: { id: string } };
  type IdVersion = { Params: { id: string; v: string } };
  const api = { config: { area: "api" as const } };
  app.get<Id>("/v2/models/:id", api, async (request) => {
    const m = models.oip(request.params.id);
    return metadata(m.snapshot.id, m.versions);
  });
  app.get<Id>("/v2/models/:id/ready", health, async (request, reply) => readiness(reply, models.oip(request.params.id).snapshot));
  app.get<IdVersion>("/v2/models/:id/versions/:v", api, async (request) => {
    const m = models.oip(request.params.id, request.params.v);
    return metadata(m.snapshot.id, m.versions);
  });
  app.get<IdVersion>("/v2/models/:id/versions/:v/ready", health, async (request, reply) => readiness(reply, models.oip(request.params.id, request.params.v).snapshot));
}
