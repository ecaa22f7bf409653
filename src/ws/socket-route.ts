/** `GET /v1/ws`: the WebSocket route, and the bounds on how many connections it holds. */
import type { FastifyInstance } from "fastify";
import type { KeyRing } from "../access/keys.js";
import { ApiError } from "../errors.js";
import type { GenerationService } from "../service/generation-service.js";
import { DEFAULT_SOCKET_LIMITS, SocketSession, type SocketLimits } from "./socket-session.js";
import { refuseUpgrade } from "./upgrade.js";

export type { SocketLimits };

export interface SocketRouteOptions {
  generation: GenerationService;
  keys: KeyRing;
  limits?: Partial<SocketLimits>;
  /** Open connections, in all and per client address; beyond them the upgrade is refused. */
  maxConnections: number;
  maxConnectionsPerClient: number;
}

export function registerSocketRoute(app: FastifyInstance, opts: SocketRouteOptions): void {
  const limits = { ...DEFAULT_SOCKET_LIMITS, ...opts.limits };
  let open = 0;
  const perClient = new Map<string, number>();
  app.get(
    "/v1/ws",
    {
      websocket: true,
      config: { area: "ws" },
      // Before the upgrade: refused connections never become sockets the server holds.
      preHandler: async (request) => {
        const client = request.socket.remoteAddress ?? "unknown";
        let refusal: ApiError | undefined;
        if (open >= opts.maxConnections) {
          refusal = new ApiError("unavailable", `The server holds its maximum of ${opts.maxConnections} WebSocket connections; try again shortly.`, { code: "too_many_connections", retryAfter: 5 });
        } else if ((perClient.get(client) ?? 0) >= opts.maxConnectionsPerClient) {
          refusal = new ApiError("rate_limited", `At most ${opts.maxConnectionsPerClient} WebSocket connections per client address.`, { code: "too_many_connections", retryAfter: 5 });
        }
        if (refusal) {
          refuseUpgrade(request, refusal);
          throw refusal;
        }
      },
    },
    (socket, request) => {
      const client = request.socket.remoteAddress ?? "unknown";
      open++;
      perClient.set(client, (perClient.get(client) ?? 0) + 1);
      socket.once("close", () => {
        open--;
        const n = (perClient.get(client) ?? 1) - 1;
        if (n <= 0) perClient.delete(client);
        else perClient.set(client, n);
      });
      new SocketSession(socket, { generation: opts.generation, keys: opts.keys, principal: request.principal, limits, headers: request.headers });
    },
  );
}
