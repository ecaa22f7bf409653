/** The chat page's static files and the Prometheus scrape. */
import { readFileSync } from "node:fs";
import type { FastifyInstance, FastifyReply } from "fastify";
import { ApiError } from "../errors.js";

export interface MetricsScrape {
  enabled: boolean;
  scrape(): Promise<{ contentType: string; body: string }>;
}

export function registerPage(app: FastifyInstance): void {
  // Three static files, read once, no build step.
  const webRoot = new URL("../../web/", import.meta.url);
  const page = (file: string, type: string) => {
    const body = readFileSync(new URL(file, webRoot));
    return async (_req: unknown, reply: FastifyReply) => reply.type(type).header("cache-control", "no-cache").send(body);
  };
  const config = { area: "page" as const };
  app.get("/", { config }, page("index.html", "text/html; charset=utf-8"));
  app.get("/chat.js", { config }, page("chat.js", "text/javascript; charset=utf-8"));
  app.get("/chat.css", { config }, page("chat.css", "text/css; charset=utf-8"));
}

export function registerMetrics(app: FastifyInstance, metrics: MetricsScrape): void {
  app.get("/metrics", { config: { area: "metrics" } }, async (_req, reply) => {
    if (!metrics.enabled) throw new ApiError("not_found", "Metrics are off (--metrics off).", { code: "metrics_off" });
    const { contentType, body } = await metrics.scrape();
    return reply.type(contentType).send(body);
  });
}
