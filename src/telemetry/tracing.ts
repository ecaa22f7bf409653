/**
 * OpenTelemetry traces, off unless configured (--otlp-endpoint, or the standard
 * OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), sent as OTLP/HTTP.
 *
 * Built from @opentelemetry/sdk-node's parts with a provider of our own instead of the
 * global one: a process (or a test file) may start several servers in turn, and a global
 * provider can be registered only once.
 *
 * Spans other than the request's own are made when the request ends, from the
 * scheduler's timestamps: nothing is traced per token.
 */
import { context as otelContext, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, type Attributes, type Context, type Span, type Tracer } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { core, resources, tracing } from "@opentelemetry/sdk-node";

export interface Tracing {
  tracer: Tracer;
  shutdown(): Promise<void>;
}

const propagator = new core.W3CTraceContextPropagator();

/** The traces endpoint from the flag, else the environment; undefined: tracing off. */
export function tracesEndpoint(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (env.OTEL_SDK_DISABLED === "true") return undefined;
  if (flag) return flag.endsWith("/v1/traces") ? flag : `${flag.replace(/\/$/, "")}/v1/traces`;
  if (env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) return env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  if (env.OTEL_EXPORTER_OTLP_ENDPOINT) return `${env.OTEL_EXPORTER_OTLP_ENDPOINT.replace(/\/$/, "")}/v1/traces`;
  return undefined;
}

export function startTracing(endpoint: string, attributes: Attributes): Tracing {
  const provider = new tracing.BasicTracerProvider({
    resource: resources.resourceFromAttributes({ "service.name": process.env.OTEL_SERVICE_NAME ?? "spindle", ...attributes }),
    spanProcessors: [new tracing.BatchSpanProcessor(new OTLPTraceExporter({ url: endpoint }), { scheduledDelayMillis: 1000 })],
  });
  return {
    tracer: provider.getTracer("spindle"),
    shutdown: () => provider.shutdown(),
  };
}

/** The parent context of an incoming W3C traceparent, if any. */
export function incomingContext(headers: Record<string, string | string[] | undefined>): Context {
  return propagator.extract(ROOT_CONTEXT, headers, {
    get: (carrier, key) => {
      const v = carrier[key];
      return Array.isArray(v) ? v[0] : v;
    },
    keys: (carrier) => Object.keys(carrier),
  });
}

/** performance.now() to epoch milliseconds, which span times take. */
export function wallClock(t: number): number {
  return performance.timeOrigin + t;
}

/** A child span covering [start, end], made after the fact. */
export function pastSpan(tracer: Tracer, parent: Span, name: string, start: number, end: number, attributes: Attributes, error?: string): void {
  const ctx = trace.setSpan(otelContext.active(), parent);
  const span = tracer.startSpan(name, { startTime: wallClock(start), attributes, kind: SpanKind.INTERNAL }, ctx);
  if (error) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
  span.end(wallClock(end));
}
