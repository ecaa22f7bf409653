/**
 * The HTTP server: fastify with the project's error envelope, access decided per route
 * area, slow-body protection, CORS when asked for, and one plugin per family of routes.
 */
import { randomBytes } from "node:crypto";
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from "fastify";
import websocket from "@fastify/websocket";
import cors from "@fastify/cors";
import type { KeyRing } from "../access/keys.js";
import type { PublicArea } from "../config/options.js";
import { ApiError } from "../errors.js";
import type { Logger } from "../log.js";
import type { GenerationService } from "../service/generation-service.js";
import type { ModelService } from "../service/model-service.js";
import type { ResponseStore } from "../service/response-store.js";
import type { TextService } from "../service/text-service.js";
import { registerSocketRoute, type SocketLimits } from "../ws/socket-route.js";
import { registerAccess } from "./access-hook.js";
import { registerJsonBody } from "./json-body.js";
import { registerAdminRoutes } from "./admin-routes.js";
import { registerHealthRoutes, registerModelRoutes } from "./model-routes.js";
import { registerGenerationRoutes, sendAnthropicError } from "./generation-routes.js";
import { registerUtilityRoutes } from "./utility-routes.js";
import { registerReadTimeout } from "./read-timeout.js";
import { fromFastifyError, sendError } from "./reply.js";
import { registerMetrics, registerPage, type MetricsScrape } from "./site-routes.js";

export interface AppOptions {
  log: Logger;
  generation: GenerationService;
  models: ModelService;
  text: TextService;
  responses: ResponseStore;
  keys: KeyRing;
  publicAreas: readonly PublicArea[];
  metrics: MetricsScrape;
  maxBodyBytes: number;
  /** Seconds a client has to send its whole request (slowloris); 408 after. */
  readTimeoutSeconds: number;
  /** Allowed browser origins; empty: CORS off. */
  corsOrigins: readonly string[];
  /** Unread bytes a stream's client may leave before its generation is cancelled. */
  maxStreamBufferBytes?: number;
  /** Largest WebSocket frame; a bigger one closes the connection with 1009. */
  maxFrameBytes?: number;
  socketLimits?: Partial<SocketLimits>;
  wsMaxConnections: number;
  wsMaxConnectionsPerClient: number;
}

const DEFAULT_STREAM_BUFFER = 4 * 1024 * 1024;

export function buildApp(opts: AppOptions): FastifyInstance {
  const app = Fastify({
    // The process's logger (a pino instance), typed as fastify's base logger so routes stay untyped by it.
    loggerInstance: opts.log as FastifyBaseLogger,
    bodyLimit: opts.maxBodyBytes,
    // One line per finished generation (the request telemetry), not fastify's two per request.
    logController: new LogController({ disableRequestLogging: true }),
    // Ids are our own, so no client can forge another request's log lines.
    genReqId: () => randomBytes(8).toString("hex"),
    // close() ends keep-alive connections too, instead of waiting out clients' idle timers.
    forceCloseConnections: true,
    // Slow headers: Node's own request timeout (408); slow bodies: registerReadTimeout.
    requestTimeout: opts.readTimeoutSeconds * 1000,
    // Node checks its timeout on an interval (30 s by default): check often enough for it to bite.
    http: { connectionsCheckingInterval: Math.min(1000, opts.readTimeoutSeconds * 250) },
  });
  // Bodies are JSON, depth-bounded; one sent as text/plain (what a bare fetch() sends) is a 415 naming its type.
  app.removeContentTypeParser("text/plain");
  registerJsonBody(app);

  app.setErrorHandler((err, request, reply) => {
    const apiErr = err instanceof ApiError ? err : fromFastifyError(err as { statusCode?: number; code?: string; message: string }, request.headers["content-type"]);
    if (apiErr.kind === "internal") request.log.error({ err }, "internal error");
    // Each API's errors in its own envelope: Anthropic's routes answer as Anthropic does.
    if (request.routeOptions.config?.errors === "anthropic") return sendAnthropicError(reply, apiErr);
    return sendError(reply, apiErr);
  });
  app.setNotFoundHandler((request, reply) =>
    sendError(reply, new ApiError("not_found", `Unknown route: ${request.method} ${request.url.split("?")[0]!.slice(0, 200)}`, { code: "unknown_route" })),
  );

  if (opts.corsOrigins.length > 0) {
    void app.register(cors, {
      origin: opts.corsOrigins.includes("*") ? "*" : [...opts.corsOrigins],
      methods: ["GET", "POST", "DELETE", "OPTIONS"],
      allowedHeaders: ["authorization", "x-api-key", "content-type", "x-priority", "x-request-timeout", "traceparent", "anthropic-version"],
      exposedHeaders: ["x-trace-id", "x-request-id", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
      maxAge: 600,
    });
  }
  // Every answer names its request (the OpenAI SDKs expose it as _request_id).
  app.addHook("onRequest", async (request, reply) => {
    reply.header("x-request-id", request.id);
  });
  registerReadTimeout(app, opts.readTimeoutSeconds);
  registerAccess(app, opts.keys, opts.publicAreas);

  registerPage(app);
  registerMetrics(app, opts.metrics);
  registerHealthRoutes(app, opts.models);
  registerModelRoutes(app, opts.models);
  registerAdminRoutes(app, opts.models);
  registerGenerationRoutes(app, { generation: opts.generation, responses: opts.responses, maxStreamBufferBytes: opts.maxStreamBufferBytes ?? DEFAULT_STREAM_BUFFER });
  registerUtilityRoutes(app, opts.text, (id, owner) => opts.responses.get(id, owner));
  void app.register(websocket, { options: { maxPayload: opts.maxFrameBytes ?? opts.maxBodyBytes } });
  void app.register(async (instance) =>
    registerSocketRoute(instance, {
      generation: opts.generation,
      keys: opts.keys,
      limits: opts.socketLimits,
      maxConnections: opts.wsMaxConnections,
      maxConnectionsPerClient: opts.wsMaxConnectionsPerClient,
    }),
  );
  return app;
}
