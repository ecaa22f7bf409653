/**
 * Per-key limits: requests in flight and tokens per minute, answered with 429,
 * Retry-After and the x-ratelimit-* headers OpenAI clients know.
 */
import { ApiError } from "../errors.js";
import type { Principal } from "./keys.js";

interface KeyState {
  inFlight: number;
  /** [time, tokens] of the last minute, oldest first. */
  window: Array<[number, number]>;
  used: number;
}

export interface LimitLease {
  /** Records the tokens a finished request used, and frees its concurrency. Idempotent. */
  release(tokens: number): void;
  headers: Record<string, string>;
}

const NO_LIMITS: LimitLease = { release() {}, headers: {} };

export class KeyLimits {
  private readonly state = new Map<number, KeyState>();

  private keyState(key: number): KeyState {
    let s = this.state.get(key);
    if (!s) this.state.set(key, (s = { inFlight: 0, window: [], used: 0 }));
    const cutoff = performance.now() - 60_000;
    while (s.window.length > 0 && s.window[0]![0] < cutoff) s.used -= s.window.shift()![1];
    return s;
  }

  /** Admits one request of this tenant or throws 429; the lease must be released. */
  admit(principal: Principal | undefined): LimitLease {
    if (principal === undefined) return NO_LIMITS;
    const { maxConcurrent, tokensPerMinute } = principal;
    if (maxConcurrent === 0 && tokensPerMinute === 0) return NO_LIMITS;
    const s = this.keyState(principal.index);
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
