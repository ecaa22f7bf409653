/**
 * Who may call what: API keys (Bearer or X-Api-Key), compared in constant time, and
 * per-key limits (requests in flight, tokens per minute) answered with 429, Retry-After
 * and the x-ratelimit-* headers OpenAI clients know.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { PublicArea } from "../config/cli.js";
import { ApiError } from "../errors.js";

export interface AccessOptions {
  keys: string[];
  /** Keys for /admin; without any, /admin answers loopback clients only. */
  adminKeys?: string[];
  publicAreas: PublicArea[];
  maxConcurrent: number;
  tokensPerMinute: number;
}

type Headers = Record<string, string | string[] | undefined>;

const digest = (s: string) => createHash("sha256").update(s, "utf8").digest();

/** Which area a path belongs to, for the public/protected decision. */
export function areaOf(path: string): PublicArea | "api" | "admin" {
  if (path === "/admin" || path.startsWith("/admin/")) return "admin";
  if (path === "/livez" || path === "/readyz" || path === "/health" || path.startsWith("/v2/health")) return "health";
  if (path === "/metrics") return "metrics";
  if (path === "/" || path === "/chat.js" || path === "/chat.css") return "page";
  return "api";
}

interface KeyState {
  inFlight: number;
  /** [time, tokens] of the last minute, oldest first. */
  window: Array<[number, number]>;
  used: number;
}

export interface Lease {
  /** Records the tokens a finished request used, and frees its concurrency. */
  release(tokens: number): void;
  headers: Record<string, string>;
}

export class AccessControl {
  private readonly digests: Buffer[];
  private readonly adminDigests: Buffer[];
  private readonly state: Map<number, KeyState> = new Map();

  constructor(private readonly opts: AccessOptions) {
    this.digests = opts.keys.map(digest);
    this.adminDigests = (opts.adminKeys ?? []).map(digest);
  }

  /**
   * The admin routes: an admin key when any is configured (a plain API key is refused
   * with 403), else loopback clients only.
   */
  authorizeAdmin(token: string | undefined, remoteAddress: string | undefined): void {
    if (this.adminDigests.length === 0) {
      const loopback = remoteAddress === "::1" || remoteAddress?.startsWith("127.") || remoteAddress?.startsWith("::ffff:127.");
      if (!loopback) throw new ApiError("forbidden", "The admin routes answer loopback clients only until an admin key is configured (--admin-key).", { code: "admin_loopback_only" });
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

  get enabled(): boolean {
    return this.digests.length > 0;
  }

  isPublic(path: string): boolean {
    const area = areaOf(path);
    return !this.enabled || (area !== "api" && area !== "admin" && this.opts.publicAreas.includes(area));
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
   * The index of the matching key, or a 401. Every configured key is compared, in
   * constant time over equal-length digests, so timing reveals neither which key nor how
   * much of one matched.
   */
  authenticate(token: string | undefined): number {
    if (token === undefined || token === "") {
      throw new ApiError("unauthorized", "Missing API key: send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.", { code: "missing_api_key" });
    }
    const d = digest(token);
    let match = -1;
    for (let i = 0; i < this.digests.length; i++) if (timingSafeEqual(d, this.digests[i]!) && match === -1) match = i;
    if (match === -1) throw new ApiError("unauthorized", "Incorrect API key provided.", { code: "invalid_api_key" });
    return match;
  }

  private keyState(key: number): KeyState {
    let s = this.state.get(key);
    if (!s) this.state.set(key, (s = { inFlight: 0, window: [], used: 0 }));
    const cutoff = performance.now() - 60_000;
    while (s.window.length > 0 && s.window[0]![0] < cutoff) s.used -= s.window.shift()![1];
    return s;
  }

  /** Admits one request of this key or throws 429; the lease must be released. */
  admit(key: number | undefined): Lease {
    if (key === undefined) return { release() {}, headers: {} };
    const s = this.keyState(key);
    const { maxConcurrent, tokensPerMinute } = this.opts;
    const headers: Record<string, string> = {};
    if (maxConcurrent > 0) {
      headers["x-ratelimit-limit-requests"] = String(maxConcurrent);
      headers["x-ratelimit-remaining-requests"] = String(Math.max(0, maxConcurrent - s.inFlight - 1));
      headers["x-ratelimit-reset-requests"] = "1s";
    }
    let resetTokens = 0;
    if (tokensPerMinute > 0) {
      resetTokens = s.window.length > 0 ? Math.max(1, Math.ceil((s.window[0]![0] + 60_000 - performance.now()) / 1000)) : 0;
      headers["x-ratelimit-limit-tokens"] = String(tokensPerMinute);
      headers["x-ratelimit-remaining-tokens"] = String(Math.max(0, tokensPerMinute - s.used));
      headers["x-ratelimit-reset-tokens"] = `${resetTokens}s`;
    }
    if (maxConcurrent > 0 && s.inFlight >= maxConcurrent) {
      throw new ApiError("rate_limited", `Rate limit reached: this key already has ${s.inFlight} requests in flight (limit ${maxConcurrent}).`, {
        code: "rate_limit_exceeded",
        retryAfter: 1,
        headers: { ...headers, "x-ratelimit-remaining-requests": "0" },
      });
    }
    if (tokensPerMinute > 0 && s.used >= tokensPerMinute) {
      throw new ApiError("rate_limited", `Rate limit reached: this key used ${s.used} tokens in the last minute (limit ${tokensPerMinute}).`, {
        code: "rate_limit_exceeded",
        retryAfter: resetTokens,
        headers,
      });
    }
    s.inFlight++;
    let released = false;
    return {
      headers,
      release: (tokens) => {
        if (released) return;
        released = true;
        s.inFlight--;
        if (tokens > 0) {
          s.window.push([performance.now(), tokens]);
          s.used += tokens;
        }
      },
    };
  }
}
