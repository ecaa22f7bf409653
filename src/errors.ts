/**
 * The one error taxonomy of the server. Every failure a client can see is an ApiError
 * of one of these kinds; the kind decides the HTTP status, the OpenAI envelope's `type`,
 * the SSE error event, the WebSocket error frame and the metric label. Declared once,
 * mapped once. A problem with how the server was started is a ConfigError instead.
 */
export type ErrorKind =
  | "invalid_request"
  | "not_found"
  | "payload_too_large"
  | "request_timeout"
  | "unsupported_media_type"
  | "conflict"
  | "unauthorized"
  | "forbidden"
  | "rate_limited"
  | "overloaded"
  | "unavailable"
  | "timeout"
  | "cancelled"
  | "model_error"
  | "internal";

interface KindInfo {
  status: number;
  type: string;
}

const KINDS: Record<ErrorKind, KindInfo> = {
  invalid_request: { status: 400, type: "invalid_request_error" },
  not_found: { status: 404, type: "invalid_request_error" },
  payload_too_large: { status: 413, type: "invalid_request_error" },
  request_timeout: { status: 408, type: "invalid_request_error" },
  unsupported_media_type: { status: 415, type: "invalid_request_error" },
  conflict: { status: 409, type: "invalid_request_error" },
  unauthorized: { status: 401, type: "authentication_error" },
  forbidden: { status: 403, type: "permission_error" },
  rate_limited: { status: 429, type: "rate_limit_error" },
  overloaded: { status: 429, type: "overloaded_error" },
  unavailable: { status: 503, type: "unavailable_error" },
  timeout: { status: 504, type: "timeout" },
  // 499 is nginx's "client closed request"; nobody reads it but logs and metrics.
  cancelled: { status: 499, type: "cancelled" },
  model_error: { status: 500, type: "model_error" },
  internal: { status: 500, type: "server_error" },
};

export interface ErrorEnvelope {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export class ApiError extends Error {
  readonly kind: ErrorKind;
  readonly param: string | null;
  readonly code: string | null;
  /** Seconds after which a retry may succeed (429/503). */
  readonly retryAfter: number | undefined;
  /** Extra response headers (x-ratelimit-*). */
  readonly headers: Record<string, string> | undefined;

  constructor(
    kind: ErrorKind,
    message: string,
    opts: { param?: string | null; code?: string | null; retryAfter?: number; headers?: Record<string, string>; cause?: unknown } = {},
  ) {
    super(message, { cause: opts.cause });
    this.name = "ApiError";
    this.kind = kind;
    this.param = opts.param ?? null;
    this.code = opts.code ?? null;
    this.retryAfter = opts.retryAfter;
    this.headers = opts.headers;
  }

  get status(): number {
    return KINDS[this.kind].status;
  }

  get type(): string {
    return KINDS[this.kind].type;
  }

  toEnvelope(): ErrorEnvelope {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export function invalidRequest(message: string, param: string | null = null, code: string | null = null): ApiError {
  return new ApiError("invalid_request", message, { param, code });
}

/** Anything thrown that is not an ApiError is an internal error; its message is not leaked. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  return new ApiError("internal", "The server had an error while processing your request.", { cause: err });
}

/** A problem with how the server was started: printed as one line, exit code 2. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}
