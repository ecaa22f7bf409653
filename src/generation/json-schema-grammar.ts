/**
 * JSON Schema → GBNF, for grammar-constrained generation: what the model writes always
 * parses and validates against the schema. Follows the shape of llama.cpp's own
 * json-schema-to-grammar (its integer-range construction in particular), as a module of
 * ours so that every keyword is either honoured or refused by name — never ignored.
 *
 * Honoured: type (and lists of types), properties, required, additionalProperties
 * (false, true, or a schema), items, prefixItems, minItems, maxItems, enum, const,
 * anyOf, oneOf, $ref to #/$defs or #/definitions, minLength, maxLength, integer
 * minimum/maximum/exclusiveMinimum/exclusiveMaximum, number bounds that are whole
 * numbers, format date/time/date-time/uuid, nullable; annotations (title, description,
 * default, examples, $schema, $id, deprecated, readOnly, writeOnly, $comment) are read
 * and left out. Everything else (pattern, multipleOf, allOf, not, if/then/else,
 * dependentRequired, fractional number bounds, …) is an UnsupportedSchemaError naming the
 * keyword and where it stands.
 */

export class UnsupportedSchemaError extends Error {
  constructor(
    readonly keyword: string,
    readonly at: string,
  ) {
    super(`'${keyword}' at ${at} is not supported by the grammar builder`);
    this.name = "UnsupportedSchemaError";
  }
}

type Schema = Record<string, unknown> | boolean;

const ANNOTATIONS = new Set(["title", "description", "default", "examples", "$schema", "$id", "deprecated", "readOnly", "writeOnly", "$comment", "strict"]);

/** Keywords each branch honours, beyond the annotations; anything else is refused. */
const KNOWN = new Set([
  "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "$ref",
  "$defs", "definitions", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format", "nullable",
]);

const PRIMITIVES: Record<string, string> = {
  ws: '| " " | "\\n" [ \\t]{0,20}',
  boolean: '("true" | "false") ws',
  null: '"null" ws',
  "integral-part": '[0] | [1-9] [0-9]{0,15}',
  "decimal-part": "[0-9]{1,16}",
  integer: '("-"? integral-part) ws',
  number: '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? ws',
  char: '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})',
  string: '"\\"" char* "\\"" ws',
  value: "object | array | string | number | boolean | null",
  object: '"{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws',
  array: '"[" ws ( value ("," ws value)* )? "]" ws',
  "date-part": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
  "time-part": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? ( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
  "date-string": '"\\"" date-part "\\"" ws',
  "time-string": '"\\"" time-part "\\"" ws',
  "date-time-string": '"\\"" date-part "T" time-part "\\"" ws',
  "uuid-string": '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} "\\"" ws',
};

/** Which primitives each needs. */
const PRIMITIVE_DEPS: Record<string, string[]> = {
  boolean: ["ws"],
  null: ["ws"],
  integer: ["integral-part", "ws"],
  number: ["integral-part", "decimal-part", "ws"],
  string: ["char", "ws"],
  value: ["object", "array", "string", "number", "boolean", "null"],
  object: ["string", "value", "ws"],
  array: ["value", "ws"],
  "date-string": ["date-part", "ws"],
  "time-string": ["time-part", "ws"],
  "date-time-string": ["date-part", "time-part", "ws"],
  "uuid-string": ["ws"],
};

/** A GBNF literal for a string. */
function literal(s: string): string {
  return `"${s.replace(/[\\"\n\r\t]/g, (c) => ({ "\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t" })[c]!)}"`;
}

/** A GBNF literal matching exactly the JSON text of a value. */
function jsonLiteral(v: unknown): string {
  return `${literal(JSON.stringify(v))} ws`;
}

/**
 * Integers in [min, max] (either may be missing), as a GBNF expression. The construction
 * of llama.cpp's _generate_min_max_int: digit-by-digit uniform ranges.
 */
export function integerRange(min: number | undefined, max: number | undefined): string {
  const out: string[] = [];
  build(min, max, out, 16, true);
  return out.join("");
}

function build(minValue: number | undefined, maxValue: number | undefined, out: string[], decimalsLeft: number, topLevel: boolean): void {
  const hasMin = minValue !== undefined;
  const hasMax = maxValue !== undefined;
  const digitRange = (from: string, to: string) => {
    out.push("[");
    if (from === to) out.push(from);
    else out.push(from, "-", to);
    out.push("]");
  };
  const moreDigits = (minDigits: number, maxDigits: number) => {
    out.push("[0-9]");
    if (minDigits === maxDigits && minDigits === 1) return;
    out.push("{", String(minDigits));
    if (maxDigits !== minDigits) {
      out.push(",");
      if (maxDigits !== Number.MAX_SAFE_INTEGER) out.push(String(maxDigits));
    }
    out.push("}");
  };
  const next = (c: string, d: number) => String.fromCharCode(c.charCodeAt(0) + d);
  const uniformRange = (fromStr: string, toStr: string) => {
    let i = 0;
    while (i < fromStr.length && fromStr[i] === toStr[i]) i++;
    if (i > 0) out.push('"', fromStr.slice(0, i), '"');
    if (i < fromStr.length) {
      if (i > 0) out.push(" ");
      const subLen = fromStr.length - i - 1;
      if (subLen > 0) {
        const fromSub = fromStr.slice(i + 1);
        const toSub = toStr.slice(i + 1);
        const subZeros = "0".repeat(subLen);
        const subNines = "9".repeat(subLen);
        let toReached = false;
        out.push("(");
        if (fromSub === subZeros) {
          digitRange(fromStr[i]!, next(toStr[i]!, -1));
          out.push(" ");
          moreDigits(subLen, subLen);
        } else {
          out.push("[", fromStr[i]!, "] (");
          uniformRange(fromSub, subNines);
          out.push(")");
          if (fromStr.charCodeAt(i) < toStr.charCodeAt(i) - 1) {
            out.push(" | ");
            if (toSub === subNines) {
              digitRange(next(fromStr[i]!, 1), toStr[i]!);
              toReached = true;
            } else {
              digitRange(next(fromStr[i]!, 1), next(toStr[i]!, -1));
            }
            out.push(" ");
            moreDigits(subLen, subLen);
          }
        }
        if (!toReached) {
          out.push(" | ");
          digitRange(toStr[i]!, toStr[i]!);
          out.push(" ");
          uniformRange(subZeros, toSub);
        }
        out.push(")");
      } else {
        out.push("[", fromStr[i]!, "-", toStr[i]!, "]");
      }
    }
  };

  if (hasMin && hasMax) {
    let lo = minValue;
    const hi = maxValue;
    if (lo < 0 && hi < 0) {
      out.push('"-" (');
      build(-hi, -lo, out, decimalsLeft, true);
      out.push(")");
      return;
    }
    if (lo < 0) {
      out.push('"-" (');
      build(0, -lo, out, decimalsLeft, true);
      out.push(") | ");
      lo = 0;
    }
    let minS = String(lo);
    const maxS = String(hi);
    for (let digits = minS.length; digits < maxS.length; digits++) {
      uniformRange(minS, "9".repeat(digits));
      minS = `1${"0".repeat(digits)}`;
      out.push(" | ");
    }
    uniformRange(minS, maxS);
    return;
  }
  const lessDecimals = Math.max(decimalsLeft - 1, 1);
  if (hasMin) {
    const m = minValue;
    if (m < 0) {
      out.push('"-" (');
      build(undefined, -m, out, decimalsLeft, false);
      out.push(") | [0] | [1-9] ");
      moreDigits(0, decimalsLeft - 1);
    } else if (m === 0) {
      if (topLevel) {
        out.push("[0] | [1-9] ");
        moreDigits(0, lessDecimals);
      } else {
        moreDigits(1, decimalsLeft);
      }
    } else if (m <= 9) {
      const c = String(m);
      const rangeStart = topLevel ? "1" : "0";
      if (c > rangeStart) {
        digitRange(rangeStart, next(c, -1));
        out.push(" ");
        moreDigits(1, lessDecimals);
        out.push(" | ");
      }
      digitRange(c, "9");
      out.push(" ");
      moreDigits(0, lessDecimals);
    } else {
      const minS = String(m);
      const len = minS.length;
      const c = minS[0]!;
      if (c > "1") {
        digitRange(topLevel ? "1" : "0", next(c, -1));
        out.push(" ");
        moreDigits(len, lessDecimals);
        out.push(" | ");
      }
      digitRange(c, c);
      out.push(" (");
      build(Number(minS.slice(1)), undefined, out, lessDecimals, false);
      out.push(")");
      if (c < "9") {
        out.push(" | ");
        digitRange(next(c, 1), "9");
        out.push(" ");
        moreDigits(len - 1, lessDecimals);
      }
    }
    return;
  }
  if (hasMax) {
    if (maxValue >= 0) {
      if (topLevel) {
        out.push('"-" [1-9] ');
        moreDigits(0, lessDecimals);
        out.push(" | ");
      }
      build(0, maxValue, out, decimalsLeft, true);
    } else {
      out.push('"-" (');
      build(-maxValue, undefined, out, decimalsLeft, false);
      out.push(")");
    }
    return;
  }
  throw new Error("integerRange: at least one bound");
}

/** The whole bounds of an integer or number schema: [min, max] with exclusives folded in. */
function bounds(s: Record<string, unknown>, at: string, integer: boolean): { min: number | undefined; max: number | undefined; minExclusive: boolean; maxExclusive: boolean } {
  const num = (k: string) => {
    const v = s[k];
    if (v === undefined) return undefined;
    if (typeof v !== "number" || !Number.isFinite(v)) throw new UnsupportedSchemaError(k, at);
    if (!Number.isInteger(v)) throw new UnsupportedSchemaError(`${k} (a fractional bound)`, at);
    if (Math.abs(v) > 1e15) throw new UnsupportedSchemaError(`${k} (beyond ±10^15)`, at);
    return v;
  };
  let min = num("minimum");
  let max = num("maximum");
  let minExclusive = false;
  let maxExclusive = false;
  const xmin = num("exclusiveMinimum");
  const xmax = num("exclusiveMaximum");
  if (xmin !== undefined && (min === undefined || xmin >= min)) {
    min = integer ? xmin + 1 : xmin;
    minExclusive = !integer;
  }
  if (xmax !== undefined && (max === undefined || xmax <= max)) {
    max = integer ? xmax - 1 : xmax;
    maxExclusive = !integer;
  }
  return { min, max, minExclusive, maxExclusive };
}

export interface CompiledGrammar {
  gbnf: string;
}

export interface CompileOptions {
  /** What the generated text must begin with, before the value (e.g. a tool-call wrapper). */
  prefix?: string;
  suffix?: string;
}

/**
 * Compiles a schema (or several alternatives under names, for tool calls) to a grammar
 * whose root is the JSON value, surrounded by optional literal text.
 */
export class SchemaGrammar {
  private readonly rules = new Map<string, string>();
  private readonly defs: Record<string, Schema>;
  private readonly refsInProgress = new Set<string>();

  constructor(private readonly root: Schema) {
    const r = typeof root === "object" ? root : {};
    this.defs = { ...((r.definitions as Record<string, Schema>) ?? {}), ...((r.$defs as Record<string, Schema>) ?? {}) };
  }

  /** The grammar for one schema: `root ::= prefix value suffix`. */
  static compile(schema: Schema, opts: CompileOptions = {}): CompiledGrammar {
    const g = new SchemaGrammar(schema);
    const value = g.visit(schema, "$", "root-value");
    return { gbnf: g.finish(`${opts.prefix ? `${literal(opts.prefix)} ` : ""}${value}${opts.suffix ? ` ${literal(opts.suffix)}` : ""}`) };
  }

  /** A grammar over a rule body written by the caller, using schemas by name (tool calls). */
  static compileWith(build: (g: { schema: (s: Schema, at: string, name: string) => string; literal: (s: string) => string; jsonLiteral: (v: unknown) => string }) => string): CompiledGrammar {
    const g = new SchemaGrammar({});
    const root = build({ schema: (s, at, name) => new SchemaGrammar(s).visitInto(g, s, at, name), literal, jsonLiteral });
    return { gbnf: g.finish(root) };
  }

  /** Visits `schema` with its own $defs, writing its rules into `target`. */
  private visitInto(target: SchemaGrammar, schema: Schema, at: string, name: string): string {
    const value = this.visit(schema, at, name);
    for (const [k, v] of this.rules) target.rules.set(k, v);
    return value;
  }

  private finish(root: string): string {
    const lines = [`root ::= ${root}`];
    for (const [k, v] of this.rules) lines.push(`${k} ::= ${v}`);
    return `${lines.join("\n")}\n`;
  }

  private usePrimitive(name: string): string {
    if (!this.rules.has(name)) {
      this.rules.set(name, PRIMITIVES[name]!);
      for (const d of PRIMITIVE_DEPS[name] ?? []) this.usePrimitive(d);
    }
    return name;
  }

  /** A rule name of our own for an expression, so nested schemas stay readable and shared. */
  private define(name: string, body: string): string {
    let key = name.replace(/[^a-zA-Z0-9-]+/g, "-").replace(/^-+|-+$/g, "") || "r";
    if (this.rules.has(key) && this.rules.get(key) !== body) {
      let i = 1;
      while (this.rules.has(`${key}-${i}`) && this.rules.get(`${key}-${i}`) !== body) i++;
      key = `${key}-${i}`;
    }
    this.rules.set(key, body);
    return key;
  }

  private check(s: Record<string, unknown>, at: string): void {
    for (const k of Object.keys(s)) {
      if (!KNOWN.has(k) && !ANNOTATIONS.has(k)) throw new UnsupportedSchemaError(k, at);
    }
  }

  private visit(schema: Schema, at: string, name: string): string {
    if (schema === true) return this.usePrimitive("value");
    if (schema === false) throw new UnsupportedSchemaError("false (a schema nothing satisfies)", at);
    if (typeof schema !== "object" || schema === null || Array.isArray(schema)) throw new UnsupportedSchemaError("(not a schema object)", at);
    const s = schema;
    this.check(s, at);
    if (s.$ref !== undefined) return this.ref(String(s.$ref), at);
    const nullable = s.nullable === true;
    const body = this.visitBody(s, at, name);
    return nullable ? this.define(`${name}-nullable`, `${body} | ${this.usePrimitive("null")}`) : body;
  }

  private ref(ref: string, at: string): string {
    const m = /^#\/(\$defs|definitions)\/(.+)$/.exec(ref);
    if (!m) throw new UnsupportedSchemaError(`$ref ${JSON.stringify(ref)} (only #/$defs/… and #/definitions/…)`, at);
    const key = m[2]!.replaceAll("~1", "/").replaceAll("~0", "~");
    const target = this.defs[key];
    if (target === undefined) throw new UnsupportedSchemaError(`$ref ${JSON.stringify(ref)} (no such definition)`, at);
    const ruleName = `ref-${key}`.replace(/[^a-zA-Z0-9-]+/g, "-");
    // Recursive schemas refer to the rule by name while it is being written.
    if (this.refsInProgress.has(ruleName) || this.rules.has(ruleName)) return ruleName;
    this.refsInProgress.add(ruleName);
    this.rules.set(ruleName, "");
    const body = this.visit(target, `#/$defs/${key}`, ruleName);
    this.rules.set(ruleName, body);
    this.refsInProgress.delete(ruleName);
    return ruleName;
  }

  private visitBody(s: Record<string, unknown>, at: string, name: string): string {
    if (s.const !== undefined) return jsonLiteral(s.const);
    if (s.enum !== undefined) {
      if (!Array.isArray(s.enum) || s.enum.length === 0) throw new UnsupportedSchemaError("enum (an empty or non-list enum)", at);
      return this.define(`${name}-enum`, s.enum.map(jsonLiteral).join(" | "));
    }
    const alternatives = (s.anyOf ?? s.oneOf) as Schema[] | undefined;
    if (alternatives !== undefined) {
      if (s.anyOf !== undefined && s.oneOf !== undefined) throw new UnsupportedSchemaError("anyOf with oneOf", at);
      if (!Array.isArray(alternatives) || alternatives.length === 0) throw new UnsupportedSchemaError(s.anyOf ? "anyOf" : "oneOf", at);
      const kw = s.anyOf ? "anyOf" : "oneOf";
      return this.define(`${name}-alt`, alternatives.map((a, i) => this.visit(a, `${at}.${kw}[${i}]`, `${name}-${i}`)).join(" | "));
    }
    const type = s.type;
    if (Array.isArray(type)) {
      if (type.length === 0) throw new UnsupportedSchemaError("type (an empty list)", at);
      return this.define(`${name}-types`, type.map((t) => this.typed(String(t), s, at, `${name}-${t}`)).join(" | "));
    }
    if (type === undefined) {
      // No type: infer it from the keywords that imply one, else any JSON value.
      if (s.properties !== undefined || s.additionalProperties !== undefined || s.required !== undefined) return this.typed("object", s, at, name);
      if (s.items !== undefined || s.prefixItems !== undefined) return this.typed("array", s, at, name);
      return this.usePrimitive("value");
    }
    return this.typed(String(type), s, at, name);
  }

  private typed(type: string, s: Record<string, unknown>, at: string, name: string): string {
    switch (type) {
      case "object":
        return this.object(s, at, name);
      case "array":
        return this.array(s, at, name);
      case "string":
        return this.string(s, at, name);
      case "integer":
        return this.integer(s, at, name);
      case "number":
        return this.number(s, at, name);
      case "boolean":
        return this.usePrimitive("boolean");
      case "null":
        return this.usePrimitive("null");
      default:
        throw new UnsupportedSchemaError(`type ${JSON.stringify(type)}`, at);
    }
  }

  private object(s: Record<string, unknown>, at: string, name: string): string {
    const props = (s.properties ?? {}) as Record<string, Schema>;
    if (typeof props !== "object" || Array.isArray(props)) throw new UnsupportedSchemaError("properties", at);
    const required = new Set((s.required ?? []) as string[]);
    for (const r of required) if (!(r in props)) throw new UnsupportedSchemaError(`required ${JSON.stringify(r)} (not among properties)`, at);
    const ws = this.usePrimitive("ws");
    const kv = (key: string) => `${literal(JSON.stringify(key))} ws ":" ws ${this.visit(props[key]!, `${at}.properties.${key}`, `${name}-${key}`)}`;
    const keys = Object.keys(props);
    const req = keys.filter((k) => required.has(k));
    const opt = keys.filter((k) => !required.has(k));
    const extra = s.additionalProperties;
    // Extra properties are never written (a valid instance need not have any), unless a
    // schema for them is all there is: then they are the object.
    let extraRule: string | undefined;
    if (extra !== undefined && extra !== false && extra !== true && keys.length === 0) {
      extraRule = `${this.usePrimitive("string")} ":" ws ${this.visit(extra as Schema, `${at}.additionalProperties`, `${name}-additional`)}`;
    } else if (extra !== undefined && typeof extra !== "boolean") {
      this.visit(extra as Schema, `${at}.additionalProperties`, `${name}-additional`);
    }
    if (extraRule) return this.define(name, `"{" ${ws} ( ${extraRule} ( "," ${ws} ${extraRule} )* )? "}" ${ws}`);
    // Required properties in order, then any subset of the optional ones, in order.
    const parts: string[] = req.map(kv);
    let optionalTail = "";
    for (let i = opt.length - 1; i >= 0; i--) {
      const item = kv(opt[i]!);
      const rest = optionalTail === "" ? "" : ` ${optionalTail}`;
      // After item i, any subset of the ones after it: one rule per position.
      optionalTail = this.define(`${name}-opt-${i}`, `( "," ${ws} ${item} )?${rest}`);
    }
    if (parts.length > 0) {
      const first = parts.join(` "," ${ws} `);
      return this.define(name, `"{" ${ws} ${first}${optionalTail ? ` ${optionalTail}` : ""} "}" ${ws}`);
    }
    if (opt.length === 0) return this.define(name, `"{" ${ws} "}" ${ws}`);
    // No required property: the first one written is any of the optional ones, followed by the later ones.
    const starts = opt.map((k, i) => {
      const after = opt.slice(i + 1).length > 0 ? ` ${this.rules.has(`${name}-opt-${i + 1}`) ? `${name}-opt-${i + 1}` : ""}` : "";
      return `${kv(k)}${after}`;
    });
    return this.define(name, `"{" ${ws} ( ${starts.join(" | ")} )? "}" ${ws}`);
  }

  private array(s: Record<string, unknown>, at: string, name: string): string {
    const ws = this.usePrimitive("ws");
    const count = (k: string) => {
      const v = s[k];
      if (v === undefined) return undefined;
      if (typeof v !== "number" || !Number.isInteger(v) || v < 0) throw new UnsupportedSchemaError(k, at);
      return v;
    };
    const min = count("minItems") ?? 0;
    const max = count("maxItems");
    if (max !== undefined && max < min) throw new UnsupportedSchemaError("maxItems (below minItems)", at);
    if (s.prefixItems !== undefined) {
      const prefix = s.prefixItems as Schema[];
      if (!Array.isArray(prefix)) throw new UnsupportedSchemaError("prefixItems", at);
      if (s.items !== undefined && s.items !== false) throw new UnsupportedSchemaError("items beside prefixItems", at);
      const items = prefix.map((p, i) => this.visit(p, `${at}.prefixItems[${i}]`, `${name}-${i}`));
      return this.define(name, `"[" ${ws} ${items.join(` "," ${ws} `)} "]" ${ws}`);
    }
    const item = s.items === undefined ? this.usePrimitive("value") : this.visit(s.items as Schema, `${at}.items`, `${name}-item`);
    if (max === 0) return this.define(name, `"[" ${ws} "]" ${ws}`);
    const more = `( "," ${ws} ${item} )`;
    let body: string;
    if (min === 0) {
      body = `( ${item} ${more}${max === undefined ? "*" : `{0,${max - 1}}`} )?`;
    } else {
      body = `${item} ${more}{${min - 1},${max === undefined ? "" : max - 1}}`;
    }
    return this.define(name, `"[" ${ws} ${body} "]" ${ws}`);
  }

  private string(s: Record<string, unknown>, at: string, name: string): string {
    if (s.format !== undefined) {
      const f = String(s.format);
      const rule = { date: "date-string", time: "time-string", "date-time": "date-time-string", uuid: "uuid-string" }[f];
      if (!rule) throw new UnsupportedSchemaError(`format ${JSON.stringify(f)}`, at);
      if (s.minLength !== undefined || s.maxLength !== undefined) throw new UnsupportedSchemaError("minLength/maxLength with format", at);
      return this.usePrimitive(rule);
    }
    const len = (k: string) => {
      const v = s[k];
      if (v === undefined) return undefined;
      if (typeof v !== "number" || !Number.isInteger(v) || v < 0) throw new UnsupportedSchemaError(k, at);
      return v;
    };
    const min = len("minLength");
    const max = len("maxLength");
    if (min === undefined && max === undefined) return this.usePrimitive("string");
    if (max !== undefined && min !== undefined && max < min) throw new UnsupportedSchemaError("maxLength (below minLength)", at);
    this.usePrimitive("char");
    const ws = this.usePrimitive("ws");
    return this.define(name, `"\\"" char{${min ?? 0},${max ?? ""}} "\\"" ${ws}`);
  }

  private integer(s: Record<string, unknown>, at: string, name: string): string {
    const { min, max } = bounds(s, at, true);
    if (min === undefined && max === undefined) return this.usePrimitive("integer");
    if (min !== undefined && max !== undefined && min > max) throw new UnsupportedSchemaError("minimum/maximum (an empty range)", at);
    const ws = this.usePrimitive("ws");
    return this.define(name, `( ${integerRange(min, max)} ) ${ws}`);
  }

  /**
   * Numbers between whole bounds. A number is written as a sign, an integer part I and a
   * fraction; for each side of zero, the magnitude m = I + fraction must lie in a range
   * [lo, hi]: I = lo (a nonzero fraction if lo is excluded), lo < I < hi with any
   * fraction, or exactly hi (zeros after the point) if hi is included. Exponents are not
   * written. Fractional bounds are refused.
   */
  private number(s: Record<string, unknown>, at: string, name: string): string {
    const { min, max, minExclusive, maxExclusive } = bounds(s, at, false);
    if (min === undefined && max === undefined) return this.usePrimitive("number");
    if (min !== undefined && max !== undefined && min > max) throw new UnsupportedSchemaError("minimum/maximum (an empty range)", at);
    this.usePrimitive("decimal-part");
    const ws = this.usePrimitive("ws");
    const anyFrac = `( "." decimal-part )?`;
    const zeroFrac = `( "." [0]{1,16} )?`;
    const nonzeroFrac = `"." [0-9]{0,15} [1-9]`;
    const magnitudes = (lo: number, loExclusive: boolean, hi: number | undefined, hiExclusive: boolean): string[] => {
      const out: string[] = [];
      if (hi !== undefined && lo > hi) return out;
      if (hi !== undefined && lo === hi) {
        if (!loExclusive && !hiExclusive) out.push(`${integerRange(lo, lo)} ${zeroFrac}`);
        return out;
      }
      out.push(`${integerRange(lo, lo)} ${loExclusive ? nonzeroFrac : anyFrac}`);
      if (hi === undefined) out.push(`( ${integerRange(lo + 1, undefined)} ) ${anyFrac}`);
      else {
        if (lo + 1 <= hi - 1) out.push(`( ${integerRange(lo + 1, hi - 1)} ) ${anyFrac}`);
        if (!hiExclusive) out.push(`${integerRange(hi, hi)} ${zeroFrac}`);
      }
      return out;
    };
    const alts: string[] = [];
    if (max === undefined || max >= 0) {
      const lo = min !== undefined && min >= 0 ? min : 0;
      alts.push(...magnitudes(lo, min !== undefined && min >= 0 && minExclusive, max, maxExclusive));
    }
    if (min === undefined || min < 0) {
      const negMax = max !== undefined && max < 0;
      // 0 itself belongs to the non-negative side.
      const neg = magnitudes(negMax ? -max! : 0, negMax ? maxExclusive : true, min === undefined ? undefined : -min, minExclusive);
      alts.push(...neg.map((m) => `"-" ${m}`));
    }
    if (alts.length === 0) throw new UnsupportedSchemaError("minimum/maximum (an empty range)", at);
    return this.define(name, `( ${alts.join(" | ")} ) ${ws}`);
  }
}
