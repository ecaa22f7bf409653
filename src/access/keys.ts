/**
 * Who a request is: API keys (Bearer or X-Api-Key) compared in constant time, each one
 * a tenant with its own name, model scope, limits, priority class and weight; and the
 * admin key for /admin (without one, /admin answers loopback clients only).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { KeySpec, PriorityClass } from "../config/keys-file.js";
import { ApiError } from "../errors.js";
import type { Headers } from "../observers.js";

/** One authenticated tenant. */
export interface Principal {
  index: number;
  /** The configured name: what metrics and logs show. */
  name: string;
  /** Model ids and aliases this key may use; undefined: all. */
  models: ReadonlySet<string> | undefined;
  /** 0: no limit. */
  maxConcurrent: number;
  tokensPerMinute: number;
  priority: PriorityClass | undefined;
  /** Its share of a model's slots when several tenants wait. */
  weight: number;
}

const digest = (s: string) => createHash("sha256").update(s, "utf8").digest();

export function isLoopback(address: string | undefined): boolean {
  return address === "::1" || address?.startsWith("127.") === true || address?.startsWith("::ffff:127.") === true;
}

export class KeyRing {
  private readonly digests: Buffer[];
  private readonly adminDigests: Buffer[];
  readonly principals: readonly Principal[];

  constructor(keys: readonly KeySpec[], adminKeys: readonly string[], defaults: { maxConcurrent: number; tokensPerMinute: number }) {
    this.digests = keys.map((k) => digest(k.key));
    this.adminDigests = adminKeys.map(digest);
    this.principals = keys.map((k, index) => ({
      index,
      name: k.name ?? `key-${index + 1}`,
      models: k.models ? new Set(k.models) : undefined,
      maxConcurrent: k.maxConcurrent ?? defaults.maxConcurrent,
      tokensPerMinute: k.tokensPerMinute ?? defaults.tokensPerMinute,
      priority: k.priority,
      weight: k.weight ?? 1,
    }));
  }

  get enabled(): boolean {
    return this.digests.length > 0;
  }

  /** The presented key from the headers, if any. */
  static presented(headers: Headers): string | undefined {
    const auth = headers.authorization;
    const a = Array.isArray(auth) ? auth[0] : auth;
    if (a !== undefined) {
      const m = /^Bearer\s+(.+)$/i.exec(a.trim());
      return m ? m[1]!.trim() : undefined;
    }
    const x = headers["x-api-key"];
    return Array.isArray(x) ? x[0] : x;
  }

  /**
   * The tenant whose key matches, or a 401. Every configured key is compared, in constant
   * time over equal-length digests, so timing reveals neither which key nor how much of
   * one matched.
   */
  authenticate(token: string | undefined): Principal {
    if (token === undefined || token === "") {
      throw new ApiError("unauthorized", "Missing API key: send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.", { code: "missing_api_key" });
    }
    const d = digest(token);
    let match = -1;
    for (let i = 0; i < this.digests.length; i++) if (timingSafeEqual(d, this.digests[i]!) && match === -1) match = i;
    if (match === -1) throw new ApiError("unauthorized", "Incorrect API key provided.", { code: "invalid_api_key" });
    return this.principals[match]!;
  }

  /**
   * The admin routes: an admin key when any is configured (a plain API key is refused
   * with 403), else loopback clients only.
   */
  authorizeAdmin(token: string | undefined, remoteAddress: string | undefined): void {
    if (this.adminDigests.length === 0) {
      if (!isLoopback(remoteAddress)) throw new ApiError("forbidden", "The admin routes answer loopback clients only until an admin key is configured (--admin-key).", { code: "admin_loopback_only" });
      return;
    }
    if (token === undefined || token === "") throw new ApiError("unauthorized", "Missing admin key.", { code: "missing_api_key" });
    const d = digest(token);
    let ok = false;
    for (const a of this.adminDigests) ok = timingSafeEqual(d, a) || ok;
    if (ok) return;
    let plain = false;
    for (const k of this.digests) plain = timingSafeEqual(d, k) || plain;
    if (plain) throw new ApiError("forbidden", "This key may not use the admin routes.", { code: "admin_key_required" });
    throw new ApiError("unauthorized", "Incorrect admin key provided.", { code: "invalid_api_key" });
  }
}

/** Whether a tenant may use a model name: listed, or an exact version (id@v) of a listed id. */
export function mayUse(principal: Principal | undefined, name: string): boolean {
  if (!principal?.models) return true;
  if (principal.models.has(name)) return true;
  const at = name.lastIndexOf("@");
  return at > 0 && principal.models.has(name.slice(0, at));
}
