/**
 * The access decision for every HTTP request, made from the area of the route that
 * matched (declared where the route is registered), so no spelling of a path — percent
 * encoding, dot segments, an absolute-form request line — can reach a route as another
 * area. Unmatched paths are classified from their decoded form; they answer 404 anyway.
 */
import type { FastifyInstance, FastifyRequest } from "fastify";
import { areaOfUnmatched, normalisedPath, type Area } from "../access/areas.js";
import { KeyRing, type Principal } from "../access/keys.js";
import type { PublicArea } from "../config/options.js";
import { toApiError } from "../errors.js";
import { isUpgrade, refuseUpgrade } from "../ws/upgrade.js";

declare module "fastify" {
  interface FastifyContextConfig {
    /** Who may call this route: required on every route. */
    area?: Area;
    /** Whose error envelope the route answers with (default OpenAI's). */
    errors?: "anthropic";
  }
  interface FastifyRequest {
    /** The tenant the request authenticated as, when keys are required. */
    principal: Principal | undefined;
  }
}

export function areaOf(request: FastifyRequest): Area {
  const declared = request.routeOptions.config?.area;
  if (declared !== undefined && request.routeOptions.url !== undefined) return declared;
  return areaOfUnmatched(normalisedPath(request.url));
}

export function registerAccess(app: FastifyInstance, keys: KeyRing, publicAreas: readonly PublicArea[]): void {
  app.decorateRequest("principal", undefined);
  // Every route declares its area; a route without one is a programming error caught at start.
  app.addHook("onRoute", (route) => {
    if (route.config?.area === undefined && route.method !== "HEAD" && !route.url.startsWith("*")) {
      throw new Error(`route ${String(route.method)} ${route.url} declares no access area`);
    }
  });
  app.addHook("onRequest", async (request) => {
    if (request.method === "OPTIONS") return;
    const area = areaOf(request);
    const token = KeyRing.presented(request.headers);
    if (area === "admin") {
      try {
        return keys.authorizeAdmin(token, request.socket.remoteAddress);
      } catch (err) {
        if (isUpgrade(request)) refuseUpgrade(request, toApiError(err));
        throw err;
      }
    }
    if (!keys.enabled) return;
    if (area !== "api" && area !== "ws" && publicAreas.includes(area)) return;
    // The WebSocket may authenticate with its first frame instead.
    if (area === "ws" && token === undefined) return;
    try {
      request.principal = keys.authenticate(token);
    } catch (err) {
      if (isUpgrade(request)) refuseUpgrade(request, toApiError(err));
      throw err;
    }
  });
}
