/**
 * The admin API: operators' changes to the repository (promote, roll back, canary,
 * shadow, load, unload) and the whole picture. Every route here is in the admin area:
 * the admin key, or loopback clients when none is configured.
 */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { modelJson, versionJson } from "../protocol/openai-models.js";
import { parseBody } from "../protocol/openai-common.js";
import type { ModelService } from "../service/model-service.js";

const versionBody = z.strictObject({ version: z.string().min(1).max(256) });
const trafficBody = z.strictObject({ version: z.string().min(1).max(256), weight: z.number().min(0).max(1) });

export function registerAdminRoutes(app: FastifyInstance, models: ModelService): void {
  const admin = { config: { area: "admin" as const } };
  app.get("/admin/status", admin, async () => {
    const s = models.status();
    const budget = s.residency.budget;
    return {
      accepting: s.accepting,
      ready: s.ready,
      memory: {
        budget_bytes: { ram: budget.ram, vram: Number.isFinite(budget.vram) ? budget.vram : null },
        resident_estimated_bytes: s.residency.used,
      },
      models: s.models.map((m) => modelJson(m, "operator")),
      aliases: s.aliases,
      versions: s.residency.versions.map((v) => versionJson(v, "operator")),
    };
  });
  type Named = { Params: { name: string } };
  app.post<Named>("/admin/models/:name/promote", admin, async (request) => {
    const { version } = parseBody(versionBody, request.body ?? {});
    return { name: request.params.name, ...(await models.promote(request.params.name, version)) };
  });
  app.post<Named>("/admin/models/:name/rollback", admin, async (request) => ({ name: request.params.name, ...(await models.rollback(request.params.name)) }));
  for (const kind of ["canary", "shadow"] as const) {
    app.post<Named>(`/admin/models/:name/${kind}`, admin, async (request) => {
      const split = parseBody(trafficBody, request.body ?? {});
      return modelJson(await models.setTraffic(request.params.name, kind, split), "operator");
    });
  }
  type Versioned = { Params: { name: string; version: string } };
  app.post<Versioned>("/admin/models/:name/versions/:version/load", admin, async (request) => versionJson(await models.load(request.params.name, request.params.version), "operator"));
  app.post<Versioned>("/admin/models/:name/versions/:version/unload", admin, async (request) => versionJson(await models.unload(request.params.name, request.params.version), "operator"));
}
