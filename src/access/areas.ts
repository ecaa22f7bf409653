/**
 * Which part of the server a route belongs to, for the access decision. Every route
 * declares its area when it is registered (fastify route config), so access is decided
 * from the route that matched — the same normalised path the router used — never from
 * the request line as the client spelled it.
 */
import type { PublicArea } from "../config/options.js";

/** api: needs an API key; admin: needs the admin key (or loopback); ws: a key on the upgrade or in the first frame. */
export type Area = PublicArea | "api" | "admin" | "ws";

/**
 * The area of a path no route matched (it answers 404 anyway): classified from the
 * decoded path, so an unknown admin path still asks for the admin key first.
 */
export function areaOfUnmatched(decodedPath: string): Area {
  const p = decodedPath.toLowerCase();
  if (p === "/admin" || p.startsWith("/admin/")) return "admin";
  return "api";
}

/** Decodes and normalises a request target's path as a router would ("/%61dmin//x/../status" → "/admin/status"). */
export function normalisedPath(url: string): string {
  let path = url;
  // Absolute-form request targets (GET http://host/path HTTP/1.1).
  const abs = /^[a-z][a-z0-9+.-]*:\/\/[^/]*/i.exec(path);
  if (abs) path = path.slice(abs[0].length) || "/";
  const q = path.search(/[?#;]/);
  if (q !== -1) path = path.slice(0, q);
  let decoded = path;
  for (let i = 0; i < 3; i++) {
    try {
      const next = decodeURIComponent(decoded);
      if (next === decoded) break;
      decoded = next;
    } catch {
      break;
    }
  }
  const out: string[] = [];
  for (const seg of decoded.replaceAll("\\", "/").split("/")) {
    if (seg === "" || seg === ".") continue;
    if (seg === "..") out.pop();
    else out.push(seg);
  }
  return `/${out.join("/")}`;
}
