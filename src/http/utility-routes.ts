/** POST /apply-template, /tokenize, /detokenize (llama-server's and vLLM's shapes). */
import type { FastifyInstance } from "fastify";
import { parseApplyTemplate, parseDetokenize, parseTokenize } from "../protocol/llama-utility.js";
import type { TextService } from "../service/text-service.js";
import { clientGone } from "./openai-routes.js";

export function registerUtilityRoutes(app: FastifyInstance, text: TextService): void {
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
  app.post("/detokenize", api, async (request, reply) => {
    const d = parseDetokenize(request.body);
    const r = await text.detokenize(d.model, d.tokens, request.principal, clientGone(reply).signal);
    return { content: r.value, prompt: r.value, model: r.model };
  });
}
