/**
 * Refusing a WebSocket upgrade. The socket of an upgrade request is no longer tracked by
 * the HTTP server once fastify sees it, so the refusal is written to it directly and the
 * socket dropped (it would otherwise outlive close()).
 */
import type { FastifyRequest } from "fastify";
import type { ApiError } from "../errors.js";

const REASONS: Record<number, string> = { 401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests", 503: "Service Unavailable" };

export function isUpgrade(request: FastifyRequest): boolean {
  return request.headers.upgrade !== undefined;
}

export function refuseUpgrade(request: FastifyRequest, error: ApiError): void {
  const body = JSON.stringify(error.toEnvelope());
  const retry = error.retryAfter !== undefined ? `retry-after: ${error.retryAfter}\r\n` : "";
  const socket = request.raw.socket;
  socket.end(
    `HTTP/1.1 ${error.status} ${REASONS[error.status] ?? "Error"}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${retry}connection: close\r\n\r\n${body}`,
  );
  socket.destroySoon();
}
