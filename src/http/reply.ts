/** Errors as HTTP answers: one envelope, the status and headers the taxonomy says. */
import type { FastifyReply } from "fastify";
import { ApiError, toApiError } from "../errors.js";

export function sendError(reply: FastifyReply, err: ApiError): FastifyReply {
  if (err.retryAfter !== undefined) reply.header("retry-after", String(err.retryAfter));
  if (err.headers) reply.headers(err.headers);
  return reply.code(err.status).type("application/json").send(err.toEnvelope());
}

/** Maps fastify's own errors (bad JSON, body too large, bad content type) to the taxonomy. */
export function fromFastifyError(err: { statusCode?: number; code?: string; message: string }, contentType?: string): ApiError {
  if (err.code === "FST_ERR_CTP_BODY_TOO_LARGE" || err.statusCode === 413) {
    return new ApiError("payload_too_large", "The request body is too large.", { code: "body_too_large" });
  }
  if (err.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE" || err.statusCode === 415) {
    const got = contentType ? ` (got ${JSON.stringify(contentType.slice(0, 100))})` : "";
    return new ApiError("unsupported_media_type", `The request body must be application/json${got}.`, { code: "unsupported_media_type" });
  }
  if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
    const msg = err.code === "FST_ERR_CTP_EMPTY_JSON_BODY" ? "The request body is empty; expected a JSON object." : `The request body is not valid JSON: ${err.message}`;
    return new ApiError("invalid_request", msg, { code: "invalid_json" });
  }
  return toApiError(err);
}
