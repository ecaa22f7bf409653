/**
 * What a model does to text without generating: POST /apply-template, /tokenize,
 * /detokenize (llama-server's and vLLM's shapes), and the token counts of the Responses
 * and Messages APIs (/v1/responses/input_tokens, /v1/messages/count_tokens).
 */
import type { FastifyInstance } from "fastify";
import { parseCountTokens } from "../protocol/anthropic-messages.js";
import { parseApplyTemplate, parseDetokenize, parseTokenize } from "../protocol/llama-utility.js";
import { parseResponses } from "../protocol/openai-responses.js";
import type { StoredResponse } from "../service/response-store.js";
import type { TextService } from "../service/text-service.js";
import { clientGone } from "./generation-routes.js";

export function registerUtilityRoutes(app: FastifyInstance, text: TextService, stored: (id: string, owner: number) => StoredResponse | undefined): void {
  const api = { config: { area: "api" as const } };
  app.post("/apply-template", api, async (request, reply) => {
    const { model, input } = parseApplyTemplate(request.body);
    const r = await text.applyTemplate(model, input, request.principal, clientGone(reply).signal);
    return { prompt: r.value.prompt, model: r.model };
  });
  app.post("/tokenize", api, async (request, reply) => {
    const t = parseTokenize(request.body);
    const signal = clientGone(reply).signal;
    let source = t.text;
    if (t.messages) source = (await text.applyTemplate(t.model, { messages: t.messages }, request.principal, signal)).value.prompt;
    const r = await text.tokenize(t.model, source!, t.addSpecial, request.principal, signal);
    const tokens = t.withPieces ? r.value.tokens.map((id, i) => ({ id, piece: r.value.pieces[i] })) : r.value.tokens;
    return { tokens, count: r.value.tokens.length, max_model_len: r.value.maxModelLen, model: r.model };
  });
  app.post("/v1/responses/input_tokens", api, async (request, reply) => {
    const plan = parseResponses(request.body, (id) => stored(id, request.principal?.index ?? -1));
    const tools = plan.body.tools?.map((t) => ({ type: "function" as const, function: { name: t.name, description: t.description ?? undefined, parameters: t.parameters ?? undefined } }));
    const r = await text.applyTemplate(plan.model, { messages: plan.messages(), tools }, request.principal, clientGone(reply).signal);
    return { object: "response.input_tokens", input_tokens: r.value.tokens };
  });
  app.post("/v1/messages/count_tokens", { config: { area: "api", errors: "anthropic" } }, async (request, reply) => {
    const c = parseCountTokens(request.body);
    const r = await text.applyTemplate(c.model, { messages: c.messages, tools: c.tools }, request.principal, clientGone(reply).signal);
    return { input_tokens: r.value.tokens };
  });
  app.post("/detokenize", api, async (request, reply) => {
    const d = parseDetokenize(request.body);
    const r = await text.detokenize(d.model, d.tokens, request.principal, clientGone(reply).signal);
    return { content: r.value, prompt: r.value, model: r.model };
  });
}
