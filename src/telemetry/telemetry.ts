/** Metrics and traces, made once at start and handed to the path as observers. */
import type { Logger } from "../log.js";
import { Metrics } from "./metrics.js";
import { ModelTelemetry } from "./model-telemetry.js";
import { RequestTelemetry } from "./request-telemetry.js";
import { startTracing, tracesEndpoint, type Tracing } from "./tracing.js";

export interface Telemetry {
  metrics: Metrics;
  tracing: Tracing | undefined;
  /** Fed one record per request by the generation service. */
  requests: RequestTelemetry;
  /** Fed the model lifecycle by residency and the registry. */
  models: ModelTelemetry;
}

export function createTelemetry(opts: { backend: string; engineVersion: string; engineBuild: { type: string; cpuVariant: string }; metrics: boolean; otlpEndpoint: string | undefined; log: Logger }): Telemetry {
  const metrics = new Metrics(opts.backend, opts.engineVersion, opts.metrics, opts.engineBuild);
  const endpoint = tracesEndpoint(opts.otlpEndpoint);
  const tracing = endpoint ? startTracing(endpoint, { "spindle.backend": opts.backend }) : undefined;
  return { metrics, tracing, requests: new RequestTelemetry(metrics, tracing, opts.log), models: new ModelTelemetry(metrics, tracing) };
}
