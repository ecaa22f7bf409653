/**
 * The JSON body parser of every route. Before anything parses a body it checks how deep
 * it nests (a scan of the text; far deeper than any request needs is refused unread),
 * then parses it, then refuses prototype-poisoning keys — fastify's own parser did the
 * last two; the first is what it did not bound.
 */
import type { FastifyInstance } from "fastify";
import { ApiError } from "../errors.js";
import { hasPoisonedKeys, jsonDepthExceeds } from "../protocol/json-limits.js";

/** Requests nest a few levels (messages → content parts → …; tool schemas a few more). */
export const MAX_BODY_DEPTH = 64;

export function registerJsonBody(app: FastifyInstance): void {
  app.removeContentTypeParser("application/json");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (_request, body, done) => {
    const text = body as string;
    if (text.trim() === "") return done(new ApiError("invalid_request", "The request body is empty; expected a JSON object.", { code: "invalid_json" }), undefined);
    if (jsonDepthExceeds(text, MAX_BODY_DEPTH)) {
      return done(new ApiError("invalid_request", `The request body nests deeper than ${MAX_BODY_DEPTH} levels.`, { code: "invalid_json" }), undefined);
    }
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (err) {
      return done(new ApiError("invalid_request", `The request body is not valid JSON: ${(err as Error).message}`, { code: "invalid_json" }), undefined);
    }
    if ((text.includes("__proto__") || text.includes("constructor")) && hasPoisonedKeys(value)) {
      return done(new ApiError("invalid_request", "The request body has a forbidden key (__proto__, or constructor.prototype).", { code: "invalid_json" }), undefined);
    }
    done(null, value);
  });
}
