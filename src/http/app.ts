import { randomBytes } from "node:crypto";
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import { ApiError, toApiError } from "../errors.js";
import type { ModelRegistry, ModelEntry } from "../models/registry.js";
import { chatRequestSchema, requestedMaxTokens, toChatMessages } from "../protocol/chat.js";
import { parseBody, stopList } from "../protocol/common.js";
import { completionPrompt, completionRequestSchema } from "../protocol/completions.js";
import { PromptRenderError, type Token } from "../engine/llama-engine.js";
import type { GenerationSink } from "../scheduler/types.js";
import { buildGenerationRequest, resolveMaxTokens, samplingParams, type RequestContext } from "../service/build-request.js";
import { JsonSink, SseSink, type Endpoint, type ResponseMeta } from "./encoders.js";

export interface AppOptions {
  registry: ModelRegistry;
  maxBodyBytes: number;
  requestTimeoutSeconds: number;
  logLevel: string;
  /** When false the server answers 503 everywhere that needs a model (shutting down). */
  isAccepting?: () => boolean;
}

/** OpenAI's legacy completions default to 16 tokens. */
const TEXT_DEFAULT_MAX_TOKENS = 16;

function sendError(reply: FastifyReply, err: ApiError): FastifyReply {
  if (err.retryAfter !== undefined) reply.header("retry-after", String(err.retryAfter));
  return reply.code(err.status).type("application/json").send(err.toEnvelope());
}

/** Maps fastify's own errors (bad JSON, body too large, bad content type) to the taxonomy. */
function fromFastifyError(err: { statusCode?: number; code?: string; message: string }): ApiError {
  if (err.code === "FST_ERR_CTP_BODY_TOO_LARGE" || err.statusCode === 413) {
    return new ApiError("payload_too_large", "The request body is too large.", { code: "body_too_large" });
  }
  if (err.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE" || err.statusCode === 415) {
    return new ApiError("unsupported_media_type", "The request body must be application/json.", { code: "unsupported_media_type" });
  }
  if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
    const msg = err.code === "FST_ERR_CTP_EMPTY_JSON_BODY" ? "The request body is empty; expected a JSON object." : `The request body is not valid JSON: ${err.message}`;
    return new ApiError("invalid_request", msg, { code: "invalid_json" });
  }
  return toApiError(err);
}

export function buildApp(opts: AppOptions): FastifyInstance {
  const { registry } = opts;
  const app = Fastify({
    bodyLimit: opts.maxBodyBytes,
    logger: opts.logLevel === "silent" ? false : { level: opts.logLevel },
    // One line per finished generation (the onResponse hook below), not two per request.
    logController: new LogController({ disableRequestLogging: true }),
    // Ids are our own, so no client can forge another request's log lines.
    genReqId: () => randomBytes(8).toString("hex"),
    // close() ends keep-alive connections too, instead of waiting out clients' idle timers.
    forceCloseConnections: true,
    onProtoPoisoning: "error",
    onConstructorPoisoning: "error",
  });

  app.setErrorHandler((err, request, reply) => {
    const apiErr = err instanceof ApiError ? err : fromFastifyError(err as { statusCode?: number; code?: string; message: string });
    if (apiErr.kind === "internal") request.log.error({ err }, "internal error");
    return sendError(reply, apiErr);
  });
  app.setNotFoundHandler((request, reply) =>
    sendError(reply, new ApiError("not_found", `Unknown route: ${request.method} ${request.url.split("?")[0]}`, { code: "unknown_route" })),
  );

  app.addHook("onResponse", (request, reply, done) => {
    if (request.url.startsWith("/v1/") && request.method === "POST") {
      request.log.info({ reqId: request.id, url: request.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime) }, "request");
    }
    done();
  });

  app.get("/livez", async () => ({ status: "ok" }));
  const ready = async (_req: FastifyRequest, reply: FastifyReply) => {
    const accepting = opts.isAccepting?.() ?? true;
    const ok = accepting && registry.ready;
    return reply.code(ok ? 200 : 503).send({
      status: ok ? "ready" : accepting ? "loading" : "shutting_down",
      models: registry.list().map((e) => ({ id: e.id, state: e.state })),
    });
  };
  app.get("/readyz", ready);
  app.get("/health", ready);

  const modelJson = (e: ModelEntry) => ({
    id: e.id,
    object: "model",
    created: e.created,
    owned_by: "spindle",
    // Extras beyond OpenAI's shape: what a client needs to size its requests.
    state: e.state,
    ...(e.error !== undefined ? { error: e.error } : {}),
    context_length: e.engine?.ctxSize ?? null,
    parallel: e.engine?.parallel ?? null,
    chat_template: e.engine?.templateName ?? null,
    scheduler: e.scheduler
      ? {
          busy_slots: e.scheduler.busySlots,
          total_slots: e.scheduler.totalSlots,
          waiting: e.scheduler.waiting,
          // Decode steps, sequences in them, sequences running at them, tokens in them:
          // items / expected is how full the steps are.
          ...{ steps: e.scheduler.stats.steps, items: e.scheduler.stats.items, expected: e.scheduler.stats.expected, tokens: e.scheduler.stats.tokens },
        }
      : null,
  });
  app.get("/v1/models", async () => ({ object: "list", data: registry.list().map(modelJson) }));
  app.get<{ Params: { id: string } }>("/v1/models/:id", async (request) => {
    const entry = registry.list().find((e) => e.id === request.params.id);
    if (!entry) throw new ApiError("not_found", `The model '${request.params.id}' does not exist.`, { param: "model", code: "model_not_found" });
    return modelJson(entry);
  });

  /** Runs one generation and answers it as JSON or SSE. */
  async function serve(
    request: FastifyRequest,
    reply: FastifyReply,
    endpoint: Endpoint,
    prepare: (ctx: RequestContext) => { entry: ReturnType<ModelRegistry["resolve"]>; stream: boolean; includeUsage: boolean; echo: string; gen: ReturnType<typeof buildGenerationRequest> },
  ) {
    if (opts.isAccepting && !opts.isAccepting()) {
      throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
    }
    const abort = new AbortController();
    // 'close' before the response finished means the client went away.
    reply.raw.on("close", () => {
      if (!reply.raw.writableFinished) abort.abort();
    });
    const { entry, stream, includeUsage, echo, gen } = prepare({
      headers: request.headers,
      signal: abort.signal,
      defaultTimeoutSeconds: opts.requestTimeoutSeconds,
    });
    const meta: ResponseMeta = {
      id: `${endpoint === "chat" ? "chatcmpl" : "cmpl"}-${randomBytes(12).toString("hex")}`,
      created: Math.floor(Date.now() / 1000),
      model: entry.id,
      endpoint,
    };
    if (stream) {
      const sink = new SseSink(reply.raw, meta, includeUsage, () => reply.hijack(), echo);
      await entry.scheduler.submit(gen, sink);
      if (sink.earlyError) throw sink.earlyError;
      return reply;
    }
    const sink = new JsonSink(meta, echo);
    await entry.scheduler.submit(gen, sink as GenerationSink);
    const result = sink.result!;
    if ("error" in result) throw result.error;
    return reply.send(result.body);
  }

  app.post("/v1/chat/completions", (request, reply) =>
    serve(request, reply, "chat", (ctx) => {
      const body = parseBody(chatRequestSchema, request.body);
      const entry = registry.resolve(body.model);
      const model = entry.engine;
      let rendered;
      try {
        rendered = model.renderChat(toChatMessages(body));
      } catch (err) {
        if (err instanceof PromptRenderError) throw new ApiError("invalid_request", err.message, { param: "messages", code: "invalid_messages" });
        throw err;
      }
      const maxParam = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
      const maxTokens = resolveMaxTokens(rendered.tokens.length, requestedMaxTokens(body), entry.sampling.max_tokens, model.ctxSize, {
        prompt: "messages",
        maxTokens: maxParam,
      });
      const sampling = samplingParams(body, entry, model);
      const gen = buildGenerationRequest({
        promptTokens: rendered.tokens,
        maxTokens,
        stop: [...stopList(body.stop), ...rendered.stopStrings],
        sampling,
        ctx,
      });
      return { entry, stream: body.stream === true, includeUsage: body.stream_options?.include_usage === true, echo: "", gen };
    }),
  );

  app.post("/v1/completions", (request, reply) =>
    serve(request, reply, "text", (ctx) => {
      const body = parseBody(completionRequestSchema, request.body);
      const entry = registry.resolve(body.model);
      const model = entry.engine;
      const prompt = completionPrompt(body);
      let tokens: Token[];
      if ("text" in prompt) {
        tokens = model.tokenizePrompt(prompt.text);
      } else {
        const bad = prompt.tokens.find((t) => !model.isValidToken(t));
        if (bad !== undefined) throw new ApiError("invalid_request", `Invalid value for 'prompt': token id ${bad} is outside the vocabulary.`, { param: "prompt", code: "invalid_value" });
        tokens = prompt.tokens as Token[];
      }
      if (tokens.length === 0) throw new ApiError("invalid_request", "The prompt is empty.", { param: "prompt", code: "invalid_value" });
      const maxTokens = resolveMaxTokens(tokens.length, body.max_tokens ?? undefined, entry.sampling.max_tokens ?? TEXT_DEFAULT_MAX_TOKENS, model.ctxSize, {
        prompt: "prompt",
        maxTokens: "max_tokens",
      });
      const echo = body.echo === true ? ("text" in prompt ? prompt.text : model.detokenize(tokens)) : "";
      const gen = buildGenerationRequest({ promptTokens: tokens, maxTokens, stop: stopList(body.stop), sampling: samplingParams(body, entry, model), ctx });
      return { entry, stream: body.stream === true, includeUsage: body.stream_options?.include_usage === true, echo, gen };
    }),
  );

  return app;
}
