/**
 * OpenAI's generation routes over HTTP: each request becomes one run of the generation
 * service, answered as one JSON body or as Server-Sent Events. The route knows bytes,
 * statuses and framing; the protocol module knows the API; the service does the rest.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { Endpoint } from "../observers.js";
import { parseChat } from "../protocol/openai-chat.js";
import { parseCompletion } from "../protocol/openai-completions.js";
import type { JsonAnswer, OpenAIPlan } from "../protocol/openai-output.js";
import type { GenerationService } from "../service/generation-service.js";
import { sendError } from "./reply.js";
import { SseTransport } from "./sse.js";

export interface GenerationRouteOptions {
  generation: GenerationService;
  /** Unread bytes a stream's client may leave before its generation is cancelled. */
  maxStreamBufferBytes: number;
}

/** An abort signal that fires when the client goes away before its answer was sent. */
export function clientGone(reply: FastifyReply): AbortController {
  const abort = new AbortController();
  reply.raw.on("close", () => {
    if (!reply.raw.writableFinished) abort.abort();
  });
  return abort;
}

export async function serveOpenAI(request: FastifyRequest, reply: FastifyReply, opts: GenerationRouteOptions, endpoint: Endpoint, parse: (body: unknown) => OpenAIPlan) {
  const abort = clientGone(reply);
  const run = opts.generation.open({ id: request.id, endpoint, transport: "http", headers: request.headers, principal: request.principal, signal: abort.signal });
  if (run.traceId) reply.header("x-trace-id", run.traceId);
  let sse: SseTransport | undefined;
  let json: JsonAnswer | undefined;
  const outcome = await run.generate(
    () => parse(request.body),
    (plan) => {
      run.responseId = plan.id;
      if (plan.stream) return plan.streamAnswer((sse = new SseTransport(reply, opts.maxStreamBufferBytes, (e) => abort.abort(e))));
      return (json = plan.jsonAnswer());
    },
  );
  if (sse?.started) return reply;
  if (outcome.error) return sendError(reply, outcome.error);
  return reply.headers(json!.headers).send(json!.body());
}

export function registerOpenAIRoutes(app: FastifyInstance, opts: GenerationRouteOptions): void {
  const config = { area: "api" as const };
  app.post("/v1/chat/completions", { config }, (req, reply) => serveOpenAI(req, reply, opts, "chat", parseChat));
  app.post("/v1/completions", { config }, (req, reply) => serveOpenAI(req, reply, opts, "completions", parseCompletion));
}
