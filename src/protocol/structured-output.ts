/**
 * What the output must look like, from every field clients use to say so: OpenAI's
 * `response_format` (json_object, json_schema), llama-server's `grammar` and
 * `json_schema`, vLLM's `structured_outputs` (json, choice, grammar) — and, for forced
 * tool calls, the call objects. Each becomes one GBNF grammar; a schema feature the
 * grammar builder cannot honour is a 400 naming it, never ignored.
 */
import { z } from "zod";
import { invalidRequest } from "../errors.js";
import { SchemaGrammar, UnsupportedSchemaError } from "../generation/json-schema-grammar.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();
const jsonSchema = z.record(z.string(), z.unknown());

export const structuredOutputFields = {
  response_format: nullish(
    z.discriminatedUnion("type", [
      z.strictObject({ type: z.literal("text") }),
      z.strictObject({ type: z.literal("json_object") }),
      z.strictObject({
        type: z.literal("json_schema"),
        json_schema: z.strictObject({
          name: z.string().max(256),
          description: z.string().optional(),
          schema: jsonSchema.optional(),
          strict: z.boolean().nullable().optional(),
        }),
      }),
    ]),
  ),
  /** llama-server: a GBNF grammar, or a JSON schema. */
  grammar: nullish(z.string().min(1).max(256 * 1024)),
  json_schema: nullish(jsonSchema),
  /** vLLM: one of json, choice, grammar. */
  structured_outputs: nullish(
    z.strictObject({
      json: nullish(z.union([jsonSchema, z.string()])),
      choice: nullish(z.array(z.string()).min(1).max(1024)),
      grammar: nullish(z.string().min(1).max(256 * 1024)),
      json_object: nullish(z.boolean()),
      regex: nullish(z.string()),
    }),
  ),
};

export interface StructuredInput {
  response_format?: { type: "text" } | { type: "json_object" } | { type: "json_schema"; json_schema: { schema?: Record<string, unknown> } } | null;
  grammar?: string | null;
  json_schema?: Record<string, unknown> | null;
  structured_outputs?: { json?: Record<string, unknown> | string | null; choice?: string[] | null; grammar?: string | null; json_object?: boolean | null; regex?: string | null } | null;
}

/** A schema as the grammar builder takes it, or a 400 naming the keyword and where it is. */
export function schemaGrammar(schema: unknown, param: string, wrap?: { prefix?: string }): string {
  try {
    return SchemaGrammar.compile(schema as Record<string, unknown>, wrap).gbnf;
  } catch (err) {
    if (err instanceof UnsupportedSchemaError) throw invalidRequest(`Invalid value for '${param}': ${err.message}.`, param, "unsupported_schema");
    throw err;
  }
}

/** The grammar the request's output must follow, if any (one source only). */
export function outputGrammar(body: StructuredInput): string | undefined {
  const found: Array<[string, () => string]> = [];
  const rf = body.response_format;
  if (rf?.type === "json_object") found.push(["response_format", () => schemaGrammar({ type: "object" }, "response_format")]);
  if (rf?.type === "json_schema") found.push(["response_format", () => schemaGrammar(rf.json_schema.schema ?? { type: "object" }, "response_format.json_schema.schema")]);
  if (body.grammar) found.push(["grammar", () => body.grammar!]);
  if (body.json_schema) found.push(["json_schema", () => schemaGrammar(body.json_schema, "json_schema")]);
  const so = body.structured_outputs;
  if (so) {
    if (so.regex != null) throw invalidRequest("Invalid value for 'structured_outputs.regex': regular expressions are not supported; send a json schema, a choice list or a grammar.", "structured_outputs.regex", "unsupported_value");
    const kinds = [so.json != null, so.choice != null, so.grammar != null, so.json_object === true].filter(Boolean).length;
    if (kinds > 1) throw invalidRequest("'structured_outputs' takes one of json, choice, grammar or json_object.", "structured_outputs", "invalid_value");
    if (so.json != null) {
      let schema: unknown = so.json;
      if (typeof schema === "string") {
        try {
          schema = JSON.parse(schema);
        } catch {
          throw invalidRequest("Invalid value for 'structured_outputs.json': not a JSON schema.", "structured_outputs.json", "invalid_value");
        }
      }
      found.push(["structured_outputs", () => schemaGrammar(schema, "structured_outputs.json")]);
    }
    if (so.choice != null) found.push(["structured_outputs", () => `root ::= ${so.choice!.map((c) => JSON.stringify(c)).join(" | ")}\n`]);
    if (so.grammar != null) found.push(["structured_outputs", () => so.grammar!]);
    if (so.json_object === true) found.push(["structured_outputs", () => schemaGrammar({ type: "object" }, "structured_outputs")]);
  }
  if (found.length > 1) throw invalidRequest(`The output is constrained twice (${found.map((f) => f[0]).join(" and ")}): send one.`, found[1]![0], "invalid_value");
  return found[0]?.[1]();
}
