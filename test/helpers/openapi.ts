/**
 * Validates server responses against OpenAI's published OpenAPI contract with Ajv's
 * JSON Schema 2020-12 validator. The file mixes in OpenAPI 3.0's `nullable`, rewritten
 * here into explicit null alternatives (see ../shared/openai-openapi/README.md).
 */
import { readFileSync } from "node:fs";
import { Ajv2020, type ValidateFunction } from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { parse } from "yaml";

const SPEC_PATH = new URL("../../../shared/openai-openapi/openapi.yaml", import.meta.url);

function rewriteNullable(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(rewriteNullable);
  if (node === null || typeof node !== "object") return node;
  const obj: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(node)) obj[k] = rewriteNullable(v);
  if (obj.nullable !== true) {
    delete obj.nullable;
    return obj;
  }
  delete obj.nullable;
  if (Array.isArray(obj.enum) && !obj.enum.includes(null)) obj.enum = [...obj.enum, null];
  if (typeof obj.type === "string") {
    obj.type = [obj.type, "null"];
    return obj;
  }
  return { anyOf: [obj, { type: "null" }] };
}

let ajv: Ajv2020 | undefined;
const cache = new Map<string, ValidateFunction>();

function getAjv(): Ajv2020 {
  if (ajv) return ajv;
  const spec = rewriteNullable(parse(readFileSync(SPEC_PATH, "utf8"))) as { components: unknown };
  ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: true });
  (addFormats as unknown as (a: Ajv2020) => void)(ajv);
  ajv.addFormat("unixtime", { type: "number", validate: (n: number) => Number.isInteger(n) && n >= 0 });
  ajv.addSchema({ $id: "openai", components: spec.components });
  return ajv;
}

export function schemaValidator(name: string): ValidateFunction {
  let v = cache.get(name);
  if (!v) {
    v = getAjv().compile({ $ref: `openai#/components/schemas/${name}` });
    cache.set(name, v);
  }
  return v;
}

/** Throws with Ajv's errors when `value` does not match the named schema. */
export function assertSchema(name: string, value: unknown): void {
  const validate = schemaValidator(name);
  if (!validate(value)) {
    throw new Error(`response does not match ${name}: ${JSON.stringify(validate.errors?.slice(0, 5))}\n${JSON.stringify(value).slice(0, 500)}`);
  }
}

/**
 * A streamed text-completion chunk. OpenAI publishes no separate schema for these: the
 * stream reuses CreateCompletionResponse, whose finish_reason is not nullable although
 * every chunk but the last carries null. So a null is checked here, and the rest of the
 * chunk against the schema with the reason filled in.
 */
export function assertCompletionChunk(chunk: { choices: Array<{ finish_reason: unknown }> }): void {
  for (const c of chunk.choices) if (c.finish_reason !== null && !["stop", "length"].includes(c.finish_reason as string)) throw new Error(`bad finish_reason ${String(c.finish_reason)}`);
  assertSchema("CreateCompletionResponse", { ...chunk, choices: chunk.choices.map((c) => ({ ...c, finish_reason: c.finish_reason ?? "stop" })) });
}

/**
 * One event of a union of events (ResponseStreamEvent…), checked against the branch its
 * `type` names, so a failure names that event's schema and not every branch's.
 */
export function assertEvent(union: string, event: { type: string }): void {
  const spec = getAjv().getSchema("openai")!.schema as { components: { schemas: Record<string, { anyOf?: Array<{ $ref: string }>; oneOf?: Array<{ $ref: string }>; properties?: { type?: { enum?: string[] } } }> } };
  const schemas = spec.components.schemas;
  const branches = schemas[union]?.anyOf ?? schemas[union]?.oneOf ?? [];
  const name = branches.map((b) => b.$ref.split("/").pop()!).find((n) => schemas[n]?.properties?.type?.enum?.includes(event.type));
  if (!name) throw new Error(`${union} has no event of type ${event.type}`);
  assertSchema(name, event);
}
