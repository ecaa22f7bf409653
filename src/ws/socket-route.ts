/** `GET /v1/ws`: the WebSocket route, and the bounds on how many connections it holds. */
import type { FastifyInstance } from "fastify";
import type { KeyRing } from "../access/keys.js";
import type { GenerationService } from "../service/generation-service.js";
import { DEFAULT_SOCKET_LIMITS, SocketSession, type SocketLimits } from "./socket-session.js";

export type { SocketLimits };

export interface SocketRouteOptions {
  generation: GenerationService;
  keys: KeyRing;
  limits?: Partial<SocketLimits>;
}

export function registerSocketRoute(app: FastifyInstance, opts: SocketRouteOptions): void {
  const limits = { ...DEFAULT_SOCKET_LIMITS, ...opts.limits };
  app.get("/v1/ws", { websocket: true, config: { area: "ws" } }, (socket, request) => {
    new SocketSession(socket, { generation: opts.generation, keys: opts.keys, principal: request.principal, limits, headers: request.headers });
  });
}
