/**
 * Slow request bodies (slowloris). Node's requestTimeout stops at the headers; a body
 * dripped byte by byte is cut here: 408 and the socket closed at the read timeout. A
 * slowloris client never holds a slot either way: slots are taken after the body is parsed.
 */
import type { FastifyInstance } from "fastify";
import { ApiError } from "../errors.js";

export function registerReadTimeout(app: FastifyInstance, readTimeoutSeconds: number): void {
  const ms = readTimeoutSeconds * 1000;
  app.addHook("onRequest", (request, _reply, done) => {
    const raw = request.raw;
    if (raw.method === "GET" || raw.method === "HEAD" || raw.complete) return done();
    const timer = setTimeout(() => {
      if (raw.complete || raw.socket.destroyed) return;
      const err = new ApiError("request_timeout", `The request body was not received within ${readTimeoutSeconds} s.`, { code: "read_timeout" });
      const body = JSON.stringify(err.toEnvelope());
      raw.socket.end(`HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      raw.socket.destroySoon();
    }, ms);
    timer.unref();
    raw.once("end", () => clearTimeout(timer));
    raw.once("close", () => clearTimeout(timer));
    done();
  });
}
