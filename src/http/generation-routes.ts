/**
 * Every generation route over HTTP — OpenAI's Chat Completions, Completions and
 * Responses, Anthropic's Messages — and embeddings: each request becomes one run of the
 * generation service, answered as one JSON body or as Server-Sent Events. The route
 * knows bytes, statuses and framing; the protocol module knows the API; the service does
 * the rest. The peers' names without /v1 (llama-server's, vLLM's) lead to the same routes.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { ApiError } from "../errors.js";
import type { Endpoint } from "../observers.js";
import { anthropicError, MessagesJson, MessagesStream, parseMessages, type MessagesPlan } from "../protocol/anthropic-messages.js";
import { parseChat } from "../protocol/openai-chat.js";
import { parseCompletion } from "../protocol/openai-completions.js";
import { parseEmbeddings } from "../protocol/openai-embeddings.js";
import type { OpenAIPlan } from "../protocol/openai-output.js";
import { parseResponses, ResponsesJson, ResponsesStream, toStored, type ResponseBuilder, type ResponsesPlan } from "../protocol/openai-responses.js";
import type { GenerationEvents, GenerationPlan } from "../service/generation.js";
import type { GenerationService } from "../service/generation-service.js";
import type { ResponseStore } from "../service/response-store.js";
import { sendError } from "./reply.js";
import { SseTransport } from "./sse.js";

export interface GenerationRouteOptions {
  generation: GenerationService;
  responses: ResponseStore;
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

/** How one API answers: its JSON collector and body, its stream, its error envelope. */
interface Answers<P extends GenerationPlan, J extends GenerationEvents> {
  id(plan: P): string;
  json(plan: P): J;
  body(json: J): unknown;
  headers(json: J): Record<string, string>;
  stream(plan: P, transport: SseTransport): GenerationEvents;
  /** After a successful answer (the Responses store). */
  finished?(plan: P, answer: J | GenerationEvents): void;
  error?(reply: FastifyReply, error: ApiError): FastifyReply;
}

async function serve<P extends GenerationPlan, J extends GenerationEvents>(
  request: FastifyRequest,
  reply: FastifyReply,
  opts: GenerationRouteOptions,
  endpoint: Endpoint,
  parse: (body: unknown) => P,
  answers: Answers<P, J>,
) {
  const abort = clientGone(reply);
  const run = opts.generation.open({ id: request.id, endpoint, transport: "http", headers: request.headers, principal: request.principal, signal: abort.signal });
  if (run.traceId) reply.header("x-trace-id", run.traceId);
  let sse: SseTransport | undefined;
  let json: J | undefined;
  let events: GenerationEvents | undefined;
  let plan: P | undefined;
  const outcome = await run.generate(
    () => (plan = parse(request.body)),
    (p) => {
      run.responseId = answers.id(p);
      if (p.stream) return (events = answers.stream(p, (sse = new SseTransport(reply, opts.maxStreamBufferBytes, (e) => abort.abort(e)))));
      return (events = json = answers.json(p));
    },
  );
  if (!outcome.error) answers.finished?.(plan!, events!);
  if (sse?.started) return reply;
  if (outcome.error) return answers.error ? answers.error(reply, outcome.error) : sendError(reply, outcome.error);
  return reply.headers(answers.headers(json!)).send(answers.body(json!));
}

const openai = <P extends OpenAIPlan>(): Answers<P, ReturnType<P["jsonAnswer"]>> => ({
  id: (p) => p.id,
  json: (p) => p.jsonAnswer() as ReturnType<P["jsonAnswer"]>,
  body: (j) => j.body(),
  headers: (j) => j.headers,
  stream: (p, t) => p.streamAnswer(t),
});

function sendAnthropicError(reply: FastifyReply, e: ApiError): FastifyReply {
  const { status, body } = anthropicError(e);
  if (e.retryAfter !== undefined) reply.header("retry-after", String(e.retryAfter));
  if (e.headers) reply.headers(e.headers);
  return reply.code(status).type("application/json").send(body);
}

/** The key a stored response belongs to: another key does not see it. */
const owner = (request: FastifyRequest) => request.principal?.index ?? -1;

export function registerGenerationRoutes(app: FastifyInstance, opts: GenerationRouteOptions): void {
  const api = { config: { area: "api" as const } };
  const both = (path: string, handler: (req: FastifyRequest, reply: FastifyReply) => unknown) => {
    app.post(`/v1${path}`, api, handler);
    app.post(path, api, handler);
  };
  both("/chat/completions", (req, reply) => serve(req, reply, opts, "chat", parseChat, openai()));
  both("/completions", (req, reply) => serve(req, reply, opts, "completions", parseCompletion, openai()));

  const responses: Answers<ResponsesPlan, ResponsesJson> = {
    id: (p) => p.id,
    json: (p) => new ResponsesJson(p),
    body: (j) => j.final(),
    headers: (j) => j.headers,
    stream: (p, t) => new ResponsesStream(p, t),
  };
  both("/responses", (req, reply) =>
    serve(req, reply, opts, "responses", (body) => parseResponses(body, (id) => opts.responses.get(id, owner(req))), {
      ...responses,
      finished: (plan, answer) => {
        if (plan.store) opts.responses.put(toStored(plan, answer as ResponseBuilder, owner(req)));
      },
    }),
  );
  type Id = { Params: { id: string } };
  const notFound = (id: string) => ({ error: { message: `Response with id '${id.slice(0, 256)}' not found.`, type: "invalid_request_error", param: "response_id", code: "response_not_found" } });
  for (const prefix of ["/v1", ""]) {
    app.get<Id>(`${prefix}/responses/:id`, api, async (req, reply) => {
      const r = opts.responses.get(req.params.id, owner(req));
      return r ? r.response : reply.code(404).send(notFound(req.params.id));
    });
    app.delete<Id>(`${prefix}/responses/:id`, api, async (req, reply) =>
      opts.responses.delete(req.params.id, owner(req)) ? { id: req.params.id, object: "response", deleted: true } : reply.code(404).send(notFound(req.params.id)),
    );
    app.get<Id>(`${prefix}/responses/:id/input_items`, api, async (req, reply) => {
      const r = opts.responses.get(req.params.id, owner(req));
      if (!r) return reply.code(404).send(notFound(req.params.id));
      const data = r.inputItems.map((item, i) => ({ id: `item_${r.id.slice(5, 21)}_${i}`, ...(item as object) }));
      return { object: "list", data, first_id: data[0]?.id ?? null, last_id: data.at(-1)?.id ?? null, has_more: false };
    });
  }

  const anthropic = { config: { area: "api" as const, errors: "anthropic" as const } };
  const messages: Answers<MessagesPlan, MessagesJson> = {
    id: (p) => p.id,
    json: (p) => new MessagesJson(p),
    body: (j) => j.message(),
    headers: (j) => j.headers,
    stream: (p, t) => new MessagesStream(p, t),
    error: sendAnthropicError,
  };
  app.post("/v1/messages", anthropic, (req, reply) => serve(req, reply, opts, "messages", parseMessages, messages));

  const embeddings = async (req: FastifyRequest, reply: FastifyReply) => {
    const abort = clientGone(reply);
    const run = opts.generation.open({ id: req.id, endpoint: "embeddings", transport: "http", headers: req.headers, principal: req.principal, signal: abort.signal });
    if (run.traceId) reply.header("x-trace-id", run.traceId);
    let plan: ReturnType<typeof parseEmbeddings> | undefined;
    const outcome = await run.embed(() => (plan = parseEmbeddings(req.body)));
    if (outcome.error) return sendError(reply, outcome.error);
    return plan!.answer(outcome.result);
  };
  app.post("/v1/embeddings", api, embeddings);
  app.post("/embeddings", api, embeddings);
}

export { sendAnthropicError };
