/**
 * What a model does to text without generating: render a chat with its template,
 * tokenize, detokenize — so users can see exactly what the model receives. Each call
 * leases the version its name resolves to (loading it, as a generation would) and obeys
 * the tenant's model scope.
 */
import { mayUse, type Principal } from "../access/keys.js";
import type { ChatRenderInput } from "../engine/prompt-renderer.js";
import type { Token } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { LoadedModel, ModelRegistry } from "../models/registry.js";
import { refKey } from "../models/repository.js";

export class TextService {
  constructor(
    private readonly registry: ModelRegistry,
    private readonly defaultTimeoutSeconds: number,
  ) {}

  /** The first model of the models file when a request names none (llama-server serves one). */
  private name(model: string | undefined): string {
    return model ?? this.registry.models()[0]!.id;
  }

  private async with<T>(model: string | undefined, principal: Principal | undefined, signal: AbortSignal, fn: (m: LoadedModel) => T): Promise<{ model: string; value: T }> {
    const name = this.name(model);
    if (!mayUse(principal, name)) throw new ApiError("forbidden", `This API key may not use the model '${name}'.`, { param: "model", code: "model_not_allowed" });
    const { lease, shadow } = await this.registry.acquire(name, undefined, performance.now() + this.defaultTimeoutSeconds * 1000, signal);
    shadow?.release();
    try {
      return { model: refKey(lease.model), value: fn(lease.model) };
    } finally {
      lease.release();
    }
  }

  applyTemplate(model: string | undefined, input: ChatRenderInput, principal: Principal | undefined, signal: AbortSignal) {
    return this.with(model, principal, signal, (m) => {
      const r = m.engine.renderChat(input);
      return { prompt: r.text, tokens: r.tokens.length };
    });
  }

  tokenize(model: string | undefined, text: string, addSpecial: boolean, principal: Principal | undefined, signal: AbortSignal) {
    return this.with(model, principal, signal, (m) => {
      const tokens = addSpecial ? m.engine.tokenizePrompt(text) : m.engine.tokenizeText(text);
      return { tokens, maxModelLen: m.engine.ctxSize, pieces: tokens.map((t) => m.engine.tokenText(t).text) };
    });
  }

  detokenize(model: string | undefined, tokens: number[], principal: Principal | undefined, signal: AbortSignal) {
    return this.with(model, principal, signal, (m) => {
      const bad = tokens.findIndex((t) => !m.engine.isValidToken(t));
      if (bad !== -1) throw invalidRequest(`Invalid value for 'tokens[${bad}]': token id ${tokens[bad]} is outside the vocabulary.`, `tokens[${bad}]`, "invalid_value");
      return m.engine.detokenizeSpecial(tokens as Token[]);
    });
  }
}
