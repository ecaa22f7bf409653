/**
 * Tools as OpenAI's APIs describe them: the definitions, tool_choice, and what they
 * mean for a generation — whether calls are forced (a grammar built from the function's
 * JSON schema, so the arguments always parse and validate) or read from the model's own
 * syntax, and how the output is split.
 */
import { z } from "zod";
import type { TemplateCapabilities, ToolDefinition } from "../engine/chat-template.js";
import { invalidRequest } from "../errors.js";
import { SchemaGrammar, UnsupportedSchemaError } from "../generation/json-schema-grammar.js";
import type { OutputSpec } from "../service/generation.js";
import { LIMITS } from "./openai-common.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();

const functionName = z.string().regex(/^[a-zA-Z0-9_.\-:]{1,128}$/, "letters, digits, '_', '.', ':' and '-', at most 128");

export const functionTool = z.strictObject({
  type: z.literal("function"),
  function: z.strictObject({
    name: functionName,
    description: z.string().max(64 * 1024).optional(),
    parameters: z.record(z.string(), z.unknown()).optional(),
    strict: z.boolean().nullable().optional(),
  }),
});

/** Tools that are not functions are refused by their type's name. */
export const toolSchema = z.custom<z.infer<typeof functionTool>>((v) => {
  if (v === null || typeof v !== "object") return false;
  return functionTool.safeParse(v).success;
}, "each tool must be {type: \"function\", function: {name, description?, parameters?, strict?}}");

export const toolsField = nullish(z.array(toolSchema).max(LIMITS.maxTools));

export const toolChoiceField = nullish(
  z.union([z.enum(["none", "auto", "required"]), z.strictObject({ type: z.literal("function"), function: z.strictObject({ name: functionName }) })]),
);

export type ToolChoice = z.infer<NonNullable<typeof toolChoiceField>>;

/** The tool types OpenAI has besides functions: named when refused. */
export function refuseOtherTools(raw: unknown, param: string): void {
  if (!Array.isArray(raw)) return;
  raw.forEach((t, i) => {
    const type = t && typeof t === "object" ? (t as { type?: unknown }).type : undefined;
    if (typeof type === "string" && type !== "function") {
      throw invalidRequest(`Invalid value for '${param}[${i}].type': '${type.slice(0, 64)}' tools are not supported here; only function tools are.`, `${param}[${i}].type`, "unsupported_value");
    }
  });
}

export interface ToolPlan {
  /** Tools the template sees (none for tool_choice "none"). */
  tools: ToolDefinition[] | undefined;
  /** A grammar that forces the calls (required, or a named function). */
  grammar: string | undefined;
  output: OutputSpec["tools"];
}

/**
 * What tools and tool_choice mean for this model: the definitions it sees, and — for
 * `required` or a named function — the grammar of a call object (`{"name": …,
 * "arguments": <the function's schema>}`; a list of them when parallel calls are
 * allowed); for `auto`, the model's own syntax is read.
 */
export function planTools(
  tools: ReadonlyArray<z.infer<typeof functionTool>> | null | undefined,
  choice: ToolChoice | null | undefined,
  parallel: boolean,
  template: TemplateCapabilities,
  params: { tools: string; choice: string },
): ToolPlan {
  if (!tools || tools.length === 0) {
    if (choice && choice !== "none" && choice !== "auto") throw invalidRequest(`'${params.choice}' asks for a tool call, but no tools were given.`, params.choice, "invalid_value");
    return { tools: undefined, grammar: undefined, output: undefined };
  }
  const names = new Set<string>();
  for (const t of tools) {
    if (names.has(t.function.name)) throw invalidRequest(`Two tools are named '${t.function.name}'.`, params.tools, "invalid_value");
    names.add(t.function.name);
  }
  const defs: ToolDefinition[] = tools.map((t) => ({ type: "function", function: { ...t.function, description: t.function.description ?? undefined, strict: t.function.strict ?? undefined } }));
  if (choice === "none") return { tools: undefined, grammar: undefined, output: undefined };
  if (choice === undefined || choice === null || choice === "auto") {
    // Templates that do not render tools get them described in a system message, and are read in that generic form.
    const family = template.tools && template.toolFamily !== "none" ? template.toolFamily : "hermes";
    return { tools: defs, grammar: undefined, output: { family } };
  }
  const forced = typeof choice === "object" ? tools.filter((t) => t.function.name === choice.function.name) : tools;
  if (forced.length === 0) throw invalidRequest(`'${params.choice}' names the function '${(choice as { function: { name: string } }).function.name}', which is not among the tools.`, params.choice, "invalid_value");
  const list = parallel && typeof choice !== "object";
  let gbnf: string;
  try {
    gbnf = SchemaGrammar.compileWith((g) => {
      const call = (t: z.infer<typeof functionTool>, i: number) =>
        `"{" ws ${g.literal('"name"')} ws ":" ws ${g.jsonLiteral(t.function.name)} "," ws ${g.literal('"arguments"')} ws ":" ws ${g.schema(t.function.parameters ?? { type: "object" }, `${params.tools}[${i}].function.parameters`, `tool-${i}`)} "}" ws`;
      const one = forced.map((t) => call(t, tools.indexOf(t))).join(" | ");
      return list ? `"[" ws ( ${one} ) ( "," ws ( ${one} ) )* "]" ws` : `( ${one} )`;
    }).gbnf;
  } catch (err) {
    if (err instanceof UnsupportedSchemaError) throw invalidRequest(`Invalid value for '${err.at}': ${err.message}.`, err.at, "unsupported_schema");
    throw err;
  }
  // `ws` is the builder's whitespace rule; make sure it exists even when no schema used it.
  if (!/^ws ::=/m.test(gbnf)) gbnf += 'ws ::= | " " | "\\n" [ \\t]{0,20}\n';
  return { tools: defs, grammar: gbnf, output: { family: "forced", list } };
}
