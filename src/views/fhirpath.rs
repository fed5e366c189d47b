//! The FHIRPath subset that SQL on FHIR v2 ViewDefinitions use, over `serde_json::Value`.
//!
//! An [`Expression`] is parsed once (hand-written lexer and recursive-descent parser) and then
//! evaluated against any number of resources. Evaluation yields a collection of [`Item`]s that
//! borrow the resource (and the expression's literals and the view's constants) where they can and
//! own only computed values.
//!
//! # Supported
//! - Paths (`name.given`), `$this`, indexers (`name[0]`), string, integer, decimal and boolean
//!   literals, `%constant` references and `%rowIndex`.
//! - Choice elements as FHIR JSON spells them: `value` finds `valueQuantity`, `valueString`, ... and
//!   knows the item's type from the suffix, so `value.ofType(Quantity)` selects `valueQuantity`.
//! - Operators, by FHIRPath precedence: unary `-`/`+`; `*` `/`; `+` (numbers and strings) `-`;
//!   `<` `>` `<=` `>=`; `=` `!=`; `and`; `or` `xor`; `implies` — with FHIRPath's empty-collection
//!   propagation and three-valued logic.
//! - Functions: `where`, `exists` (with or without criteria), `empty`, `first`, `not`, `ofType`,
//!   `extension(url)`, `join([separator])`, `lowBoundary([precision])`,
//!   `highBoundary([precision])`, and the SQL on FHIR functions `getResourceKey()` (the `id` of
//!   each resource in its input; elements give nothing) and `getReferenceKey([type])` (the id of a
//!   `Type/id` reference, relative or at the end of an absolute URL, with any `/_history/...`
//!   dropped; contained `#id` and `urn:` references give nothing). Criteria are evaluated per
//!   input item; other arguments against `$this`, as fhirpath.js does.
//! - Date, dateTime, instant and time values (constants and typed choice elements) compare by
//!   FHIRPath's precision rules; a value without a timezone offset is taken to be in UTC.
//!
//! # Refused at parse time
//! Every other function and operator (`|`, `&`, `~`, `div`, `mod`, `in`, `is`, `as`, ...),
//! date/time and quantity literals, `$index`/`$total`, unknown `%names`, and expressions nested
//! deeper than [`MAX_DEPTH`].
//!
//! # Without a FHIR model
//! Elements carry a type only when FHIR JSON shows it (choice suffixes, `resourceType`) or when it
//! comes from a typed constant. Otherwise a JSON string counts as any string-based FHIR primitive
//! (and as a date or time only if it is shaped like one), a JSON number as integer or decimal,
//! and an object as its `resourceType`; `ofType(HumanName)` on a non-choice element therefore
//! finds nothing. Decimals are `f64`: `+`, `-` and `*` round to the operands' decimal places, and a
//! decimal's precision is read from its shortest representation (`1.0` keeps one place, `1.50`
//! has two only in the source text, which `serde_json` does not keep).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::slice;

use serde_json::{Number, Value};
use thiserror::Error;

/// The deepest expression tree the parser accepts, so that evaluating or dropping a hostile
/// expression can never exhaust the stack.
pub const MAX_DEPTH: usize = 128;

/// FHIR primitive types, spelled as in `ofType()` and (capitalised) in choice-element suffixes.
#[rustfmt::skip]
const PRIMITIVE_TYPES: &[&str] = &[
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
    "instant", "integer", "integer64", "markdown", "oid", "positiveInt", "string", "time",
    "unsignedInt", "uri", "url", "uuid",
];

/// FHIR complex types that a choice element (`value[x]`, `effective[x]`, ...) can take.
#[rustfmt::skip]
const COMPLEX_TYPES: &[&str] = &[
    "Address", "Age", "Annotation", "Attachment", "Availability", "CodeableConcept",
    "CodeableReference", "Coding", "ContactDetail", "ContactPoint", "Contributor", "Count",
    "DataRequirement", "Distance", "Dosage", "Duration", "Expression", "ExtendedContactDetail",
    "HumanName", "Identifier", "Meta", "MonetaryComponent", "Money", "ParameterDefinition",
    "Period", "Quantity", "Range", "Ratio", "RatioRange", "Reference", "RelatedArtifact",
    "SampledData", "Signature", "Timing", "TriggerDefinition", "UsageContext",
    "VirtualServiceDetail",
];

/// FHIRPath system types, with the FHIR primitive each one stands for.
const SYSTEM_TYPES: &[(&str, &str)] = &[
    ("Boolean", "boolean"),
    ("String", "string"),
    ("Integer", "integer"),
    ("Decimal", "decimal"),
    ("Date", "date"),
    ("DateTime", "dateTime"),
    ("Time", "time"),
];

/// The FHIR type a choice-element suffix names (`"DateTime"` → `"dateTime"`,
/// `"Quantity"` → `"Quantity"`), if it names one.
pub fn choice_type(suffix: &str) -> Option<&'static str> {
    PRIMITIVE_TYPES
        .iter()
        .chain(COMPLEX_TYPES)
        .copied()
        .find(|ty| {
            let (mut t, mut s) = (ty.chars(), suffix.chars());
            matches!((t.next(), s.next()), (Some(a), Some(b)) if a.to_ascii_uppercase() == b)
                && t.eq(s)
        })
}

/// A named value an expression refers to as `%name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    /// The name after `%`.
    pub name: String,
    /// The value, as FHIR JSON represents it.
    pub value: Value,
    /// Its FHIR type, e.g. `"date"` or `"integer"`.
    pub ty: &'static str,
}

/// The FHIR types a ViewDefinition constant may have (`valueBase64Binary` ... `valueUuid`).
#[rustfmt::skip]
const CONSTANT_TYPES: &[&str] = &[
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
    "instant", "integer", "integer64", "oid", "positiveInt", "string", "time", "unsignedInt",
    "uri", "url", "uuid",
];

impl Constant {
    /// A ViewDefinition constant `name` with value `value[x]`, `suffix` being what follows `value`
    /// (e.g. `"DateTime"`). Refuses types the specification does not allow and values that do not
    /// fit their type; an `integer64` written as a JSON string becomes a number.
    pub fn new(name: &str, suffix: &str, value: &Value) -> Result<Constant, &'static str> {
        let ty = choice_type(suffix)
            .filter(|ty| CONSTANT_TYPES.contains(ty))
            .ok_or("is not a supported constant type")?;
        let integer = |min: i64| match value.as_i64() {
            Some(i) if i >= min => Ok(value.clone()),
            _ => Err("must be an integer in range"),
        };
        let value = match (ty, value) {
            ("boolean", Value::Bool(_)) | ("decimal", Value::Number(_)) => value.clone(),
            ("integer" | "integer64", Value::Number(_)) => integer(i64::MIN)?,
            ("unsignedInt", _) => integer(0)?,
            ("positiveInt", _) => integer(1)?,
            ("integer64", Value::String(s)) => {
                Value::from(s.parse::<i64>().map_err(|_| "must be an integer")?)
            }
            ("date" | "dateTime" | "instant" | "time", Value::String(s)) => {
                let kind = Temporal::parse(s).map(|t| t.kind);
                let fits = match ty {
                    "date" => kind == Some(Kind::Date),
                    "time" => kind == Some(Kind::Time),
                    _ => matches!(kind, Some(Kind::Date | Kind::DateTime)),
                };
                if !fits {
                    return Err("is not a valid date or time of its type");
                }
                value.clone()
            }
            ("boolean" | "decimal" | "integer", _) => return Err("has the wrong JSON type"),
            (_, Value::String(_)) => value.clone(),
            _ => return Err("must be a string"),
        };
        Ok(Constant {
            name: name.to_owned(),
            value,
            ty,
        })
    }
}

/// What an expression is evaluated in, besides its focus.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The constants the expression was parsed with, in the same order.
    pub constants: &'a [Constant],
    /// The value of `%rowIndex`.
    pub row_index: usize,
}

/// One item of a FHIRPath collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<'a> {
    /// The value: borrowed from the resource, the expression or the constants, or computed.
    pub value: Cow<'a, Value>,
    /// The FHIR type when it is known (choice elements, constants, computed values).
    pub ty: Option<&'static str>,
}

impl<'a> Item<'a> {
    /// An item of unknown FHIR type borrowing `value`, e.g. a resource.
    pub fn node(value: &'a Value) -> Self {
        Item {
            value: Cow::Borrowed(value),
            ty: None,
        }
    }

    fn owned(value: Value, ty: Option<&'static str>) -> Self {
        Item {
            value: Cow::Owned(value),
            ty,
        }
    }

    fn boolean(b: bool) -> Self {
        Item::owned(Value::Bool(b), Some("boolean"))
    }

    fn string(s: String) -> Self {
        Item::owned(Value::String(s), Some("string"))
    }

    /// A name for the item's type, for error messages (never its value).
    pub fn kind(&self) -> &'static str {
        if let Some(ty) = self.ty {
            return ty;
        }
        match &*self.value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) => match Num::of(n) {
                Num::Int(_) => "integer",
                Num::Dec(_) => "decimal",
            },
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "element",
        }
    }
}

/// Why an expression could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message} at position {position}")]
pub struct ParseError {
    /// What is wrong.
    pub message: String,
    /// Where, in characters from the start of the expression.
    pub position: usize,
}

/// Why an expression could not be evaluated. Messages name types and operators, never values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EvalError {
    /// An operand or input had several items where FHIRPath requires at most one.
    #[error("{0} needs a single item but got {1}")]
    NotSingleton(&'static str, usize),
    /// An operand or input had a type the operation does not accept.
    #[error("{0} cannot take {1}")]
    Type(&'static str, String),
    /// Integer arithmetic left the 64-bit range, or decimal arithmetic the finite range.
    #[error("arithmetic overflow in {0}")]
    Overflow(&'static str),
    /// The context had fewer constants than the expression was parsed with.
    #[error("constant %{0} was not supplied")]
    MissingConstant(String),
}

/// A parsed FHIRPath expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    root: Expr,
    text: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// The focus: `$this`, or the implicit start of a path.
    This,
    Literal(Value),
    /// Index into [`Context::constants`], with the name for errors.
    Constant(usize, String),
    RowIndex,
    Member(Box<Expr>, String),
    Call(Box<Expr>, Func),
    Index(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Func {
    Where(Box<Expr>),
    Exists(Option<Box<Expr>>),
    Empty,
    First,
    Not,
    OfType(String),
    Extension(Box<Expr>),
    Join(Option<Box<Expr>>),
    ResourceKey,
    ReferenceKey(Option<String>),
    Boundary {
        high: bool,
        precision: Option<Box<Expr>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Implies,
    Or,
    Xor,
    And,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    /// Binding strength: higher binds tighter.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Implies => 1,
            BinOp::Or | BinOp::Xor => 2,
            BinOp::And => 3,
            BinOp::Eq | BinOp::Ne => 4,
            BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => 5,
            BinOp::Add | BinOp::Sub => 6,
            BinOp::Mul | BinOp::Div => 7,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            BinOp::Implies => "`implies`",
            BinOp::Or => "`or`",
            BinOp::Xor => "`xor`",
            BinOp::And => "`and`",
            BinOp::Eq => "`=`",
            BinOp::Ne => "`!=`",
            BinOp::Lt => "`<`",
            BinOp::Gt => "`>`",
            BinOp::Le => "`<=`",
            BinOp::Ge => "`>=`",
            BinOp::Add => "`+`",
            BinOp::Sub => "`-`",
            BinOp::Mul => "`*`",
            BinOp::Div => "`/`",
        }
    }
}

impl Expression {
    /// Parses `text`, resolving `%name` against `constants` (and `%rowIndex`).
    pub fn parse(text: &str, constants: &[Constant]) -> Result<Self, ParseError> {
        let tokens = lex(text)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            constants,
        };
        let (root, _) = parser.expression(0)?;
        match parser.peek() {
            Tok::End => Ok(Expression {
                root,
                text: text.to_owned(),
            }),
            _ => Err(parser.error("unexpected token after the end of the expression")),
        }
    }

    /// The source text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the expression is exactly `%rowIndex`.
    pub fn is_row_index(&self) -> bool {
        self.root == Expr::RowIndex
    }

    /// Adds to `names` the members of the focus that evaluating the expression can read (a
    /// member `value` also stands for its choice forms, `valueString` and the rest). False when
    /// it may read more than named members: the focus itself as a value (`$this`, a function
    /// applied to the focus, a type name such as `Patient.name`), so the whole focus is needed.
    pub fn focus_members(&self, names: &mut BTreeSet<String>) -> bool {
        members(&self.root, names)
    }

    /// Evaluates the expression with `focus` as `$this`.
    pub fn evaluate<'a>(
        &'a self,
        focus: &[Item<'a>],
        ctx: &Context<'a>,
    ) -> Result<Vec<Item<'a>>, EvalError> {
        eval(&self.root, focus, ctx)
    }
}

/// [`Expression::focus_members`] of `expr`: only what is evaluated against the focus counts
/// (the criteria of `where()` and `exists()` are evaluated against the input's items).
fn members(expr: &Expr, names: &mut BTreeSet<String>) -> bool {
    match expr {
        Expr::This => false,
        Expr::Literal(_) | Expr::Constant(..) | Expr::RowIndex => true,
        Expr::Member(base, name) => match &**base {
            // An element name starts in lower case; `Patient` names the focus's own type.
            Expr::This if name.starts_with(|c: char| c.is_ascii_lowercase()) => {
                names.insert(name.clone());
                true
            }
            Expr::This => false,
            base => members(base, names),
        },
        Expr::Call(base, func) => {
            let input = match (&**base, func) {
                (Expr::This, Func::ResourceKey) => {
                    names.insert("id".to_owned());
                    names.insert("resourceType".to_owned());
                    true
                }
                (Expr::This, _) => false,
                (base, _) => members(base, names),
            };
            input
                && match func {
                    Func::Extension(arg)
                    | Func::Join(Some(arg))
                    | Func::Boundary {
                        precision: Some(arg),
                        ..
                    } => members(arg, names),
                    Func::Where(_)
                    | Func::Exists(_)
                    | Func::Empty
                    | Func::First
                    | Func::Not
                    | Func::OfType(_)
                    | Func::Join(None)
                    | Func::ResourceKey
                    | Func::ReferenceKey(_)
                    | Func::Boundary {
                        precision: None, ..
                    } => true,
                }
        }
        Expr::Index(base, index) => members(base, names) && members(index, names),
        Expr::Neg(operand) => members(operand, names),
        Expr::Binary(_, lhs, rhs) => members(lhs, names) && members(rhs, names),
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

fn at(position: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        message: message.into(),
        position,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Dec(Number),
    /// `%name`
    Var(String),
    /// `$this`
    This,
    Sym(&'static str),
    End,
}

/// The functions taking expressions as arguments (`ofType` and `getReferenceKey` take types).
#[rustfmt::skip]
const FUNCTIONS: &[&str] = &[
    "where", "exists", "empty", "first", "not", "extension", "join", "lowBoundary",
    "highBoundary", "getResourceKey",
];

const SYMBOLS: &[&str] = &[
    "<=", ">=", "!=", "(", ")", "[", "]", ".", ",", "+", "-", "*", "/", "=", "<", ">",
];

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            i += 2;
            loop {
                match (chars.get(i), chars.get(i + 1)) {
                    (Some('*'), Some('/')) => break i += 2,
                    (Some(_), _) => i += 1,
                    (None, _) => return Err(at(start, "unterminated comment")),
                }
            }
            continue;
        }
        let tok = if c.is_ascii_alphabetic() || c == '_' {
            let word = take_while(&chars, &mut i, |c| c.is_ascii_alphanumeric() || c == '_');
            Tok::Ident(word)
        } else if c == '`' {
            Tok::Ident(quoted(&chars, &mut i, '`')?)
        } else if c == '\'' {
            Tok::Str(quoted(&chars, &mut i, '\'')?)
        } else if c.is_ascii_digit() {
            let mut number = take_while(&chars, &mut i, |c| c.is_ascii_digit());
            if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                i += 1;
                number.push('.');
                number.push_str(&take_while(&chars, &mut i, |c| c.is_ascii_digit()));
                match number.parse().ok().and_then(Number::from_f64) {
                    Some(d) => Tok::Dec(d),
                    None => return Err(at(start, "decimal literal out of range")),
                }
            } else {
                match number.parse::<i64>() {
                    Ok(n) => Tok::Int(n),
                    Err(_) => return Err(at(start, "integer literal out of range")),
                }
            }
        } else if c == '%' {
            i += 1;
            let name = match chars.get(i) {
                Some('`') => quoted(&chars, &mut i, '`')?,
                Some('\'') => quoted(&chars, &mut i, '\'')?,
                Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                    take_while(&chars, &mut i, |c| c.is_ascii_alphanumeric() || c == '_')
                }
                _ => return Err(at(start, "expected a name after `%`")),
            };
            Tok::Var(name)
        } else if c == '$' {
            i += 1;
            let name = take_while(&chars, &mut i, |c| c.is_ascii_alphanumeric());
            if name != "this" {
                return Err(at(start, format!("`${name}` is not supported")));
            }
            Tok::This
        } else if let Some(sym) = SYMBOLS.iter().find(|s| {
            let mut s = s.chars();
            s.next() == Some(c) && s.next().is_none_or(|s2| next == Some(s2))
        }) {
            i += sym.len();
            Tok::Sym(sym)
        } else {
            let hint = match c {
                '@' => " (date/time literals are not supported)",
                '|' | '&' | '~' | '!' => " (this operator is not supported)",
                '{' | '}' => " (empty collection literals are not supported)",
                _ => "",
            };
            return Err(at(start, format!("unexpected character {c:?}{hint}")));
        };
        tokens.push((tok, start));
    }
    tokens.push((Tok::End, chars.len()));
    Ok(tokens)
}

fn take_while(chars: &[char], i: &mut usize, f: impl Fn(char) -> bool) -> String {
    let start = *i;
    while chars.get(*i).is_some_and(|&c| f(c)) {
        *i += 1;
    }
    chars[start..*i].iter().collect()
}

/// Reads a `'string'` or `` `identifier` `` starting at `chars[*i]`, with FHIRPath escapes.
fn quoted(chars: &[char], i: &mut usize, delim: char) -> Result<String, ParseError> {
    let start = *i;
    *i += 1;
    let mut out = String::new();
    loop {
        let Some(&c) = chars.get(*i) else {
            return Err(at(start, "unterminated string or identifier"));
        };
        *i += 1;
        if c == delim {
            return Ok(out);
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escape = chars.get(*i).copied();
        *i += 1;
        out.push(match escape {
            Some(c @ ('\'' | '"' | '`' | '\\' | '/')) => c,
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('u') => {
                let hex: String = chars.get(*i..*i + 4).unwrap_or_default().iter().collect();
                *i += 4;
                Some(&hex)
                    .filter(|h| h.len() == 4 && h.chars().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .and_then(char::from_u32)
                    .ok_or_else(|| at(*i - 6, "invalid \\u escape"))?
            }
            _ => return Err(at(*i - 2, "invalid escape")),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

struct Parser<'c> {
    tokens: Vec<(Tok, usize)>,
    pos: usize,
    constants: &'c [Constant],
}

/// A parsed sub-expression and the height of its tree.
type Parsed = (Expr, usize);

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        self.tokens.get(self.pos).map_or(&Tok::End, |(t, _)| t)
    }

    fn position(&self) -> usize {
        self.tokens.get(self.pos).map_or(0, |&(_, p)| p)
    }

    fn error(&self, message: &str) -> ParseError {
        at(self.position(), message)
    }

    fn next(&mut self) -> Tok {
        let tok = self.peek().clone();
        self.pos += 1;
        tok
    }

    fn eat(&mut self, sym: &str) -> bool {
        let found = matches!(self.peek(), Tok::Sym(s) if *s == sym);
        if found {
            self.pos += 1;
        }
        found
    }

    fn expect(&mut self, sym: &str) -> Result<(), ParseError> {
        if self.eat(sym) {
            Ok(())
        } else {
            Err(self.error(&format!("expected `{sym}`")))
        }
    }

    /// Fails when a tree of height `height` (or syntax nested that deep) would be too deep.
    fn check_depth(&self, height: usize) -> Result<usize, ParseError> {
        if height > MAX_DEPTH {
            Err(self.error(&format!(
                "expression is nested too deeply (the limit is {MAX_DEPTH})"
            )))
        } else {
            Ok(height)
        }
    }

    fn binop(&self) -> Result<Option<BinOp>, ParseError> {
        Ok(Some(match self.peek() {
            Tok::Sym("=") => BinOp::Eq,
            Tok::Sym("!=") => BinOp::Ne,
            Tok::Sym("<") => BinOp::Lt,
            Tok::Sym(">") => BinOp::Gt,
            Tok::Sym("<=") => BinOp::Le,
            Tok::Sym(">=") => BinOp::Ge,
            Tok::Sym("+") => BinOp::Add,
            Tok::Sym("-") => BinOp::Sub,
            Tok::Sym("*") => BinOp::Mul,
            Tok::Sym("/") => BinOp::Div,
            Tok::Ident(word) => match word.as_str() {
                "and" => BinOp::And,
                "or" => BinOp::Or,
                "xor" => BinOp::Xor,
                "implies" => BinOp::Implies,
                "div" | "mod" | "in" | "contains" | "is" | "as" => {
                    return Err(self.error(&format!("operator `{word}` is not supported")));
                }
                _ => return Ok(None),
            },
            _ => return Ok(None),
        }))
    }

    /// `depth` is how deeply the syntax being parsed is nested, checked before recursing.
    fn expression(&mut self, depth: usize) -> Result<Parsed, ParseError> {
        self.check_depth(depth)?;
        self.binary(1, depth)
    }

    /// Precedence climbing over the binary operators binding at least as tightly as `min`.
    fn binary(&mut self, min: u8, depth: usize) -> Result<Parsed, ParseError> {
        let (mut lhs, mut height) = self.unary(depth)?;
        while let Some(op) = self.binop()?.filter(|op| op.precedence() >= min) {
            self.pos += 1;
            let (rhs, rh) = self.binary(op.precedence() + 1, depth)?;
            height = self.check_depth(height.max(rh) + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok((lhs, height))
    }

    fn unary(&mut self, depth: usize) -> Result<Parsed, ParseError> {
        let negate = match self.peek() {
            Tok::Sym("-") => true,
            Tok::Sym("+") => false,
            _ => return self.postfix(depth),
        };
        self.pos += 1;
        self.check_depth(depth + 1)?;
        let (operand, height) = self.unary(depth + 1)?;
        if negate {
            Ok((Expr::Neg(Box::new(operand)), self.check_depth(height + 1)?))
        } else {
            Ok((operand, height))
        }
    }

    fn postfix(&mut self, depth: usize) -> Result<Parsed, ParseError> {
        let (mut expr, mut height) = self.term(depth)?;
        loop {
            if self.eat(".") {
                let position = self.position();
                let Tok::Ident(name) = self.next() else {
                    return Err(at(position, "expected a name after `.`"));
                };
                (expr, height) = self.invocation(expr, height, name, depth)?;
            } else if self.eat("[") {
                let (index, ih) = self.expression(depth + 1)?;
                self.expect("]")?;
                height = self.check_depth(height.max(ih) + 1)?;
                expr = Expr::Index(Box::new(expr), Box::new(index));
            } else {
                return Ok((expr, height));
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<Parsed, ParseError> {
        let position = self.position();
        let expr = match self.next() {
            Tok::Int(n) => Expr::Literal(n.into()),
            Tok::Dec(d) => Expr::Literal(Value::Number(d)),
            Tok::Str(s) => Expr::Literal(s.into()),
            Tok::This => Expr::This,
            Tok::Ident(word) if word == "true" || word == "false" => {
                Expr::Literal(Value::Bool(word == "true"))
            }
            Tok::Ident(name) => return self.invocation(Expr::This, 0, name, depth),
            Tok::Var(name) if name == "rowIndex" => Expr::RowIndex,
            Tok::Var(name) => match self.constants.iter().position(|c| c.name == name) {
                Some(i) => Expr::Constant(i, name),
                None => {
                    return Err(at(position, format!("unknown constant `%{name}`")));
                }
            },
            Tok::Sym("(") => {
                let inner = self.expression(depth + 1)?;
                self.expect(")")?;
                return Ok(inner);
            }
            _ => {
                return Err(at(position, "expected an expression"));
            }
        };
        Ok((expr, 1))
    }

    /// `name` or `name(args)` applied to `base`.
    fn invocation(
        &mut self,
        base: Expr,
        height: usize,
        name: String,
        depth: usize,
    ) -> Result<Parsed, ParseError> {
        let position = self.position();
        if !self.eat("(") {
            let height = self.check_depth(height + 1)?;
            return Ok((Expr::Member(Box::new(base), name), height));
        }
        let arity = |expected: &str| at(position, format!("{name}() takes {expected}"));
        if name == "ofType" || name == "getReferenceKey" {
            let ty = if self.eat(")") {
                None
            } else {
                let ty = self.type_specifier()?;
                self.expect(")")?;
                Some(ty)
            };
            let func = match ty {
                Some(ty) if name == "ofType" => Func::OfType(ty),
                None if name == "ofType" => return Err(arity("a type")),
                ty => Func::ReferenceKey(ty),
            };
            let height = self.check_depth(height + 1)?;
            return Ok((Expr::Call(Box::new(base), func), height));
        }
        if !FUNCTIONS.contains(&name.as_str()) {
            return Err(at(
                position,
                format!("function `{name}()` is not supported"),
            ));
        }
        let mut args = Vec::new();
        let mut height = height;
        if !self.eat(")") {
            loop {
                let (arg, arg_height) = self.expression(depth + 1)?;
                height = height.max(arg_height);
                args.push(Box::new(arg));
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        let height = self.check_depth(height + 1)?;
        let mut args = args.into_iter();
        let arg = args.next();
        if args.next().is_some() {
            return Err(arity("at most one argument"));
        }
        let no_arg = |func| match arg {
            None => Ok(func),
            Some(_) => Err(arity("no arguments")),
        };
        let func = match name.as_str() {
            "where" => Func::Where(arg.ok_or_else(|| arity("a criteria argument"))?),
            "exists" => Func::Exists(arg),
            "extension" => Func::Extension(arg.ok_or_else(|| arity("a url argument"))?),
            "join" => Func::Join(arg),
            "lowBoundary" | "highBoundary" => Func::Boundary {
                high: name == "highBoundary",
                precision: arg,
            },
            "empty" => no_arg(Func::Empty)?,
            "first" => no_arg(Func::First)?,
            "not" => no_arg(Func::Not)?,
            _ => no_arg(Func::ResourceKey)?,
        };
        Ok((Expr::Call(Box::new(base), func), height))
    }

    /// A type name, optionally qualified with `FHIR.` or `System.`.
    fn type_specifier(&mut self) -> Result<String, ParseError> {
        let position = self.position();
        let mut name = match self.next() {
            Tok::Ident(name) => name,
            _ => return Err(at(position, "expected a type name")),
        };
        if (name == "FHIR" || name == "System") && self.eat(".") {
            let qualifier = name;
            let position = self.position();
            name = match self.next() {
                Tok::Ident(name) => name,
                _ => return Err(at(position, "expected a type name")),
            };
            if qualifier == "System" && !SYSTEM_TYPES.iter().any(|(s, _)| *s == name) {
                return Err(at(position, format!("unknown type `System.{name}`")));
            }
        }
        // Complex, system and resource types (for contained resources and
        // `getReferenceKey(Patient)`) are capitalised.
        let known = PRIMITIVE_TYPES.contains(&name.as_str())
            || name.starts_with(|c: char| c.is_ascii_uppercase());
        if known {
            Ok(name)
        } else {
            Err(at(position, format!("unknown type `{name}`")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

type Items<'a> = Vec<Item<'a>>;

fn eval<'a>(expr: &'a Expr, focus: &[Item<'a>], ctx: &Context<'a>) -> Result<Items<'a>, EvalError> {
    Ok(match expr {
        Expr::This => focus.to_vec(),
        Expr::Literal(value) => vec![Item::node(value)],
        Expr::Constant(i, name) => {
            let c = ctx
                .constants
                .get(*i)
                .ok_or_else(|| EvalError::MissingConstant(name.clone()))?;
            vec![Item {
                value: Cow::Borrowed(&c.value),
                ty: Some(c.ty),
            }]
        }
        Expr::RowIndex => vec![Item::owned(ctx.row_index.into(), Some("integer"))],
        Expr::Member(base, name) => {
            let input = input(base, focus, ctx)?;
            let mut out = Vec::new();
            for item in input.iter() {
                push_member(&mut out, item, name);
            }
            out
        }
        Expr::Call(base, func) => call(func, &input(base, focus, ctx)?, focus, ctx)?,
        Expr::Index(base, index) => {
            let index = match single(eval(index, focus, ctx)?, "an indexer")? {
                None => return Ok(Vec::new()),
                Some(item) => match Num::from_item(&item) {
                    Some(Num::Int(i)) => i,
                    _ => return Err(EvalError::Type("an indexer", item.kind().into())),
                },
            };
            let items = input(base, focus, ctx)?;
            usize::try_from(index)
                .ok()
                .and_then(|i| items.get(i).cloned())
                .into_iter()
                .collect()
        }
        Expr::Neg(operand) => match single(eval(operand, focus, ctx)?, "unary `-`")? {
            None => Vec::new(),
            Some(item) => vec![negate(&item)?],
        },
        Expr::Binary(op, lhs, rhs) => binary(*op, lhs, rhs, focus, ctx)?,
    })
}

/// The input of a path step: the focus itself, or what `base` evaluates to.
fn input<'a, 'f>(
    base: &'a Expr,
    focus: &'f [Item<'a>],
    ctx: &Context<'a>,
) -> Result<Cow<'f, [Item<'a>]>, EvalError> {
    match base {
        Expr::This => Ok(Cow::Borrowed(focus)),
        _ => eval(base, focus, ctx).map(Cow::Owned),
    }
}

/// Pushes the children named `name` of `item`: the element itself, the elements of a choice
/// (`name` + a type suffix, typed accordingly), or the resource itself when `name` is its type.
fn push_member<'a>(out: &mut Items<'a>, item: &Item<'a>, name: &str) {
    match &item.value {
        Cow::Borrowed(value) => push_children(out, value, name, item, Item::node),
        Cow::Owned(value) => {
            push_children(out, value, name, item, |v| Item::owned(v.clone(), None))
        }
    }
}

fn push_children<'a, 'v>(
    out: &mut Items<'a>,
    value: &'v Value,
    name: &str,
    item: &Item<'a>,
    make: impl Fn(&'v Value) -> Item<'a>,
) {
    let Value::Object(map) = value else { return };
    let mut push = |child: &'v Value, ty: Option<&'static str>| match child {
        Value::Array(elements) => out.extend(
            elements
                .iter()
                .filter(|e| !e.is_null())
                .map(|e| Item { ty, ..make(e) }),
        ),
        Value::Null => {}
        child => out.push(Item { ty, ..make(child) }),
    };
    if let Some(child) = map.get(name) {
        push(child, None);
    } else if map.get("resourceType").and_then(Value::as_str) == Some(name) {
        out.push(item.clone());
    } else {
        for (key, child) in map {
            if let Some(ty) = key.strip_prefix(name).and_then(choice_type) {
                push(child, Some(ty));
            }
        }
    }
}

/// The only item of `items`, if any; an error if there are several.
fn single<'a>(items: Items<'a>, what: &'static str) -> Result<Option<Item<'a>>, EvalError> {
    match items.len() {
        0 | 1 => Ok(items.into_iter().next()),
        count => Err(EvalError::NotSingleton(what, count)),
    }
}

/// FHIRPath's singleton evaluation of a collection as a boolean: empty is `None`, a single
/// non-boolean item is `true`, several items are an error.
fn truth(items: &[Item<'_>], what: &'static str) -> Result<Option<bool>, EvalError> {
    match items {
        [] => Ok(None),
        [item] => Ok(Some(item.value.as_bool().unwrap_or(true))),
        _ => Err(EvalError::NotSingleton(what, items.len())),
    }
}

/// Applies `func` to `input`. Criteria (`where`, `exists`) are evaluated per input item; other
/// arguments against the focus (`$this`), as fhirpath.js does.
fn call<'a>(
    func: &'a Func,
    input: &[Item<'a>],
    focus: &[Item<'a>],
    ctx: &Context<'a>,
) -> Result<Items<'a>, EvalError> {
    let keep = |criteria: &'a Expr, item: &Item<'a>| -> Result<bool, EvalError> {
        let result = eval(criteria, slice::from_ref(item), ctx)?;
        Ok(truth(&result, "the criteria of where()/exists()")? == Some(true))
    };
    let string_arg = |arg: &'a Expr, what: &'static str| -> Result<Option<String>, EvalError> {
        match single(eval(arg, focus, ctx)?, what)? {
            None => Ok(None),
            Some(item) => match item.value.as_str() {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(EvalError::Type(what, item.kind().into())),
            },
        }
    };
    Ok(match func {
        Func::Where(criteria) => {
            let mut out = Vec::new();
            for item in input {
                if keep(criteria, item)? {
                    out.push(item.clone());
                }
            }
            out
        }
        Func::Exists(None) => vec![Item::boolean(!input.is_empty())],
        Func::Exists(Some(criteria)) => {
            let mut found = false;
            for item in input {
                if keep(criteria, item)? {
                    found = true;
                    break;
                }
            }
            vec![Item::boolean(found)]
        }
        Func::Empty => vec![Item::boolean(input.is_empty())],
        Func::First => input.first().cloned().into_iter().collect(),
        Func::Not => truth(input, "not()")?
            .map(|b| Item::boolean(!b))
            .into_iter()
            .collect(),
        Func::OfType(ty) => input
            .iter()
            .filter(|item| type_matches(item, ty))
            .cloned()
            .collect(),
        Func::Extension(url) => {
            let Some(url) = string_arg(url, "the url of extension()")? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for item in input {
                push_member(&mut out, item, "extension");
            }
            out.retain(|e| e.value.get("url").and_then(Value::as_str) == Some(url.as_str()));
            out
        }
        Func::Join(separator) => {
            let separator = match separator {
                Some(arg) => string_arg(arg, "the separator of join()")?.unwrap_or_default(),
                None => String::new(),
            };
            let mut parts = Vec::with_capacity(input.len());
            for item in input {
                parts.push(match &*item.value {
                    Value::String(s) => Cow::Borrowed(s.as_str()),
                    Value::Number(n) => Cow::Owned(n.to_string()),
                    Value::Bool(b) => Cow::Owned(b.to_string()),
                    _ => return Err(EvalError::Type("join()", item.kind().into())),
                });
            }
            vec![Item::string(parts.join(&separator))]
        }
        Func::ResourceKey => input
            .iter()
            .filter(|item| item.value.get("resourceType").is_some())
            .filter_map(|item| item.value.get("id")?.as_str())
            .map(|id| Item::string(id.to_owned()))
            .collect(),
        Func::ReferenceKey(ty) => input
            .iter()
            .filter_map(|item| item.value.get("reference")?.as_str())
            .filter_map(|reference| reference_key(reference, ty.as_deref()))
            .map(|key| Item::string(key.to_owned()))
            .collect(),
        Func::Boundary { high, precision } => {
            let what = if *high {
                "highBoundary()"
            } else {
                "lowBoundary()"
            };
            let precision = match precision {
                None => None,
                Some(arg) => match single(eval(arg, focus, ctx)?, what)? {
                    None => return Ok(Vec::new()),
                    Some(item) => match Num::from_item(&item) {
                        Some(Num::Int(p)) => Some(p),
                        _ => return Err(EvalError::Type(what, item.kind().into())),
                    },
                },
            };
            match input {
                [] => Vec::new(),
                [item] => boundary(item, precision, *high, what)?
                    .into_iter()
                    .collect(),
                _ => return Err(EvalError::NotSingleton(what, input.len())),
            }
        }
    })
}

/// The key a reference points at: the id of a relative `Type/id` reference (or of an absolute
/// URL ending in `Type/id`), optionally with `/_history/version`, when `Type` is `want` if given.
fn reference_key<'r>(reference: &'r str, want: Option<&str>) -> Option<&'r str> {
    let path = reference.split("/_history/").next()?;
    let absolute = path.starts_with("http://") || path.starts_with("https://");
    let mut segments = path.rsplit('/');
    let (id, ty) = (segments.next()?, segments.next()?);
    let relative = segments.next().is_none();
    let valid_id = (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let valid_type = ty.starts_with(|c: char| c.is_ascii_uppercase())
        && ty.chars().all(|c| c.is_ascii_alphanumeric());
    let wanted = want.is_none_or(|want| want == ty);
    ((relative || absolute) && valid_id && valid_type && wanted).then_some(id)
}

/// Whether `item` is of the type `spec` names (see the module docs for untyped items).
fn type_matches(item: &Item<'_>, spec: &str) -> bool {
    let spec = SYSTEM_TYPES
        .iter()
        .find(|(system, _)| *system == spec)
        .map_or(spec, |&(_, fhir)| fhir);
    if let Some(ty) = item.ty {
        return ty == spec;
    }
    match &*item.value {
        Value::Bool(_) => spec == "boolean",
        Value::Number(n) => match Num::of(n) {
            Num::Int(i) => match spec {
                "integer" | "decimal" => true,
                "unsignedInt" => i >= 0,
                "positiveInt" => i > 0,
                _ => false,
            },
            Num::Dec(_) => spec == "decimal",
        },
        Value::String(s) => match spec {
            "date" => Temporal::parse(s).is_some_and(|t| t.kind == Kind::Date),
            "dateTime" | "instant" => Temporal::parse(s).is_some_and(|t| t.kind != Kind::Time),
            "time" => Temporal::parse(s).is_some_and(|t| t.kind == Kind::Time),
            "boolean" | "decimal" | "integer" | "positiveInt" | "unsignedInt" => false,
            _ => PRIMITIVE_TYPES.contains(&spec),
        },
        Value::Object(map) => map.get("resourceType").and_then(Value::as_str) == Some(spec),
        _ => false,
    }
}

fn binary<'a>(
    op: BinOp,
    lhs: &'a Expr,
    rhs: &'a Expr,
    focus: &[Item<'a>],
    ctx: &Context<'a>,
) -> Result<Items<'a>, EvalError> {
    let what = op.symbol();
    let boolean = |b: Option<bool>| -> Items<'a> { b.map(Item::boolean).into_iter().collect() };
    let side = |e: &'a Expr| eval(e, focus, ctx);
    match op {
        BinOp::And | BinOp::Or | BinOp::Xor | BinOp::Implies => {
            let l = truth(&side(lhs)?, what)?;
            let short = match op {
                BinOp::And => l == Some(false),
                BinOp::Or => l == Some(true),
                BinOp::Implies => l == Some(false),
                _ => false,
            };
            if short {
                return Ok(boolean(Some(op != BinOp::And)));
            }
            let r = truth(&side(rhs)?, what)?;
            Ok(boolean(match (op, l, r) {
                (BinOp::And, _, Some(false)) => Some(false),
                (BinOp::And, Some(true), Some(true)) => Some(true),
                (BinOp::Or, _, Some(true)) => Some(true),
                (BinOp::Or, Some(false), Some(false)) => Some(false),
                (BinOp::Xor, Some(a), Some(b)) => Some(a != b),
                (BinOp::Implies, Some(true), r) => r,
                (BinOp::Implies, None, Some(true)) => Some(true),
                _ => None,
            }))
        }
        BinOp::Eq | BinOp::Ne => {
            let (l, r) = (side(lhs)?, side(rhs)?);
            if l.is_empty() || r.is_empty() {
                return Ok(Vec::new());
            }
            let mut equal = Some(l.len() == r.len());
            for (a, b) in l.iter().zip(&r) {
                match (equal, items_equal(a, b)) {
                    (Some(false), _) => break,
                    (_, Some(true)) => {}
                    (_, Some(false)) => equal = Some(false),
                    (_, None) => equal = None,
                }
            }
            Ok(boolean(equal.map(|e| e == (op == BinOp::Eq))))
        }
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let (Some(a), Some(b)) = (single(side(lhs)?, what)?, single(side(rhs)?, what)?) else {
                return Ok(Vec::new());
            };
            let ordering = compare(&a, &b, what)?;
            Ok(boolean(ordering.map(|o| match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Gt => o == Ordering::Greater,
                BinOp::Le => o != Ordering::Greater,
                _ => o != Ordering::Less,
            })))
        }
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => {
            let (Some(a), Some(b)) = (single(side(lhs)?, what)?, single(side(rhs)?, what)?) else {
                return Ok(Vec::new());
            };
            arithmetic(op, &a, &b)
        }
    }
}

/// A JSON number as FHIRPath sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn of(n: &Number) -> Num {
        match n.as_i64() {
            Some(i) => Num::Int(i),
            // Every JSON number serde_json holds converts; NaN never compares equal.
            None => Num::Dec(n.as_f64().unwrap_or(f64::NAN)),
        }
    }

    fn from_item(item: &Item<'_>) -> Option<Num> {
        match &*item.value {
            Value::Number(n) => Some(Num::of(n)),
            _ => None,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            // Precision loss beyond 2^53 is inherent in mixing integers with decimals.
            Num::Int(i) => i as f64,
            Num::Dec(d) => d,
        }
    }
}

fn numbers_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    match (Num::of(a), Num::of(b)) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (x, y) => x.as_f64().partial_cmp(&y.as_f64()),
    }
}

fn is_temporal_type(ty: Option<&str>) -> bool {
    matches!(ty, Some("date" | "dateTime" | "instant" | "time"))
}

/// Item equality: `None` when FHIRPath says the answer is unknown (date/times of different
/// precision).
fn items_equal(a: &Item<'_>, b: &Item<'_>) -> Option<bool> {
    if let (Value::String(x), Value::String(y)) = (&*a.value, &*b.value)
        && (is_temporal_type(a.ty) || is_temporal_type(b.ty))
    {
        return match (Temporal::parse(x), Temporal::parse(y)) {
            (Some(x), Some(y)) if (x.kind == Kind::Time) == (y.kind == Kind::Time) => {
                x.compare(&y).map(|o| o == Ordering::Equal)
            }
            _ => Some(false),
        };
    }
    Some(json_equal(&a.value, &b.value))
}

/// JSON equality with numbers equal by value (`1 = 1.0`).
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

fn compare(a: &Item<'_>, b: &Item<'_>, what: &'static str) -> Result<Option<Ordering>, EvalError> {
    let mismatch = || EvalError::Type(what, format!("{} and {}", a.kind(), b.kind()));
    match (&*a.value, &*b.value) {
        (Value::Number(x), Value::Number(y)) => Ok(numbers_cmp(x, y)),
        (Value::String(x), Value::String(y)) => {
            if !is_temporal_type(a.ty) && !is_temporal_type(b.ty) {
                return Ok(Some(x.as_str().cmp(y.as_str())));
            }
            match (Temporal::parse(x), Temporal::parse(y)) {
                (Some(x), Some(y)) if (x.kind == Kind::Time) == (y.kind == Kind::Time) => {
                    Ok(x.compare(&y))
                }
                _ => Err(mismatch()),
            }
        }
        _ => Err(mismatch()),
    }
}

fn negate<'a>(item: &Item<'a>) -> Result<Item<'a>, EvalError> {
    match Num::from_item(item) {
        Some(Num::Int(i)) => i
            .checked_neg()
            .map(|n| Item::owned(n.into(), None))
            .ok_or(EvalError::Overflow("unary `-`")),
        Some(Num::Dec(d)) => Ok(Item::owned(decimal(-d, "unary `-`")?, None)),
        None => Err(EvalError::Type("unary `-`", item.kind().into())),
    }
}

fn decimal(d: f64, what: &'static str) -> Result<Value, EvalError> {
    Number::from_f64(d)
        .map(Value::Number)
        .ok_or(EvalError::Overflow(what))
}

fn arithmetic<'a>(op: BinOp, a: &Item<'a>, b: &Item<'a>) -> Result<Items<'a>, EvalError> {
    let what = op.symbol();
    if let (BinOp::Add, Value::String(x), Value::String(y)) = (op, &*a.value, &*b.value) {
        return Ok(vec![Item::string(format!("{x}{y}"))]);
    }
    let (Some(x), Some(y)) = (Num::from_item(a), Num::from_item(b)) else {
        return Err(EvalError::Type(
            what,
            format!("{} and {}", a.kind(), b.kind()),
        ));
    };
    if let (Num::Int(x), Num::Int(y), false) = (x, y, op == BinOp::Div) {
        let result = match op {
            BinOp::Add => x.checked_add(y),
            BinOp::Sub => x.checked_sub(y),
            _ => x.checked_mul(y),
        };
        return result
            .map(|n| vec![Item::owned(n.into(), None)])
            .ok_or(EvalError::Overflow(what));
    }
    let (scale_x, scale_y) = (scale(a), scale(b));
    let (x, y) = (x.as_f64(), y.as_f64());
    let result = match op {
        BinOp::Add => round(x + y, scale_x.max(scale_y)),
        BinOp::Sub => round(x - y, scale_x.max(scale_y)),
        BinOp::Mul => round(x * y, scale_x.saturating_add(scale_y)),
        _ if y == 0.0 => return Ok(Vec::new()),
        _ => x / y,
    };
    Ok(vec![Item::owned(decimal(result, what)?, None)])
}

/// The number of decimal places of a numeric item, as its shortest representation shows them.
fn scale(item: &Item<'_>) -> u32 {
    match &*item.value {
        Value::Number(n) => Decimal::of(n).map_or(0, |d| d.scale),
        _ => 0,
    }
}

/// Rounds `x` to `places` decimal places, undoing binary floating-point noise (`0.1 + 0.2`).
fn round(x: f64, places: u32) -> f64 {
    if places > 17 {
        return x;
    }
    format!("{x:.prec$}", prec = places as usize)
        .parse()
        .unwrap_or(x)
}

/// A decimal as `mantissa × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    /// Reads serde_json's shortest representation (`1.0`, `0.95`, `1e-7`, `42`).
    fn of(n: &Number) -> Option<Decimal> {
        let text = n.to_string();
        let (digits, exponent) = match text.split_once(['e', 'E']) {
            Some((digits, exponent)) => (digits.to_owned(), exponent.parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((&digits, ""));
        let mantissa: i128 = format!("{int}{frac}").parse().ok()?;
        let scale = i32::try_from(frac.len()).ok()?.checked_sub(exponent)?;
        match u32::try_from(scale) {
            Ok(scale) => Some(Decimal { mantissa, scale }),
            Err(_) => Some(Decimal {
                mantissa: mantissa.checked_mul(10i128.checked_pow(scale.unsigned_abs())?)?,
                scale: 0,
            }),
        }
    }

    fn to_value(self) -> Option<Value> {
        let text = format!("{}e-{}", self.mantissa, self.scale);
        Number::from_f64(text.parse().ok()?).map(Value::Number)
    }
}

/// `lowBoundary()`/`highBoundary()` of one item, `None` for an unsupported precision.
fn boundary<'a>(
    item: &Item<'a>,
    precision: Option<i64>,
    high: bool,
    what: &'static str,
) -> Result<Option<Item<'a>>, EvalError> {
    match &*item.value {
        Value::Number(n) => {
            let Some(d) = Decimal::of(n) else {
                return Ok(None);
            };
            Ok(decimal_boundary(d, precision.unwrap_or(8), high)
                .and_then(Decimal::to_value)
                .map(|v| Item::owned(v, Some("decimal"))))
        }
        Value::String(s) if item.ty.is_none() || is_temporal_type(item.ty) => {
            let mut t =
                Temporal::parse(s).ok_or_else(|| EvalError::Type(what, item.kind().into()))?;
            if matches!(item.ty, Some("dateTime" | "instant")) && t.kind == Kind::Date {
                t.kind = Kind::DateTime;
            }
            Ok(t.boundary(precision, high)
                .map(|(s, ty)| Item::owned(Value::String(s), Some(ty))))
        }
        _ => Err(EvalError::Type(what, item.kind().into())),
    }
}

/// The decimal boundary to `precision` places: the input ± half a unit of its last place, floored
/// (low) or ceiled (high) to `precision` places.
fn decimal_boundary(d: Decimal, precision: i64, high: bool) -> Option<Decimal> {
    let precision = u32::try_from(precision).ok().filter(|p| *p <= 28)?;
    let half = if high { 5 } else { -5 };
    let units = d.mantissa.checked_mul(10)?.checked_add(half)?;
    let scale = d.scale.checked_add(1)?;
    let mantissa = if precision >= scale {
        units.checked_mul(10i128.checked_pow(precision - scale)?)?
    } else {
        let divisor = 10i128.checked_pow(scale - precision)?;
        let (q, r) = (units.div_euclid(divisor), units.rem_euclid(divisor));
        if high && r != 0 { q.checked_add(1)? } else { q }
    };
    Some(Decimal {
        mantissa,
        scale: precision,
    })
}

// ---------------------------------------------------------------------------------------------
// Dates and times

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Date,
    DateTime,
    Time,
}

/// A partial date, date-time or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Temporal {
    kind: Kind,
    /// Year, month, day, hour, minute, second, millisecond.
    parts: [u32; 7],
    /// Index of the first part present: 0, or 3 for a time.
    first: usize,
    /// One past the last part present.
    end: usize,
    /// Offset from UTC in minutes.
    tz: Option<i32>,
}

struct Cursor<'s> {
    bytes: &'s [u8],
    at: usize,
}

impl Cursor<'_> {
    fn eat(&mut self, b: u8) -> bool {
        let found = self.bytes.get(self.at) == Some(&b);
        self.at += usize::from(found);
        found
    }

    fn digits(&mut self, n: usize) -> Option<u32> {
        let mut value = 0u32;
        for _ in 0..n {
            let d = self.bytes.get(self.at).filter(|b| b.is_ascii_digit())?;
            value = value * 10 + u32::from(d - b'0');
            self.at += 1;
        }
        Some(value)
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Temporal {
    /// Parses FHIR/ISO 8601 text: `YYYY[-MM[-DD[Thh[:mm[:ss[.fff]]][tz]]]]` or `hh[:mm[:ss[.fff]]]`.
    fn parse(s: &str) -> Option<Temporal> {
        let mut c = Cursor {
            bytes: s.as_bytes(),
            at: 0,
        };
        let mut t = Temporal {
            kind: Kind::Date,
            parts: [0, 1, 1, 0, 0, 0, 0],
            first: 0,
            end: 0,
            tz: None,
        };
        let is_date = s.len() == 4 || (s.len() >= 5 && s.as_bytes().get(4) == Some(&b'-'));
        if is_date {
            t.parts[0] = c.digits(4)?;
            t.end = 1;
            for i in 1..3 {
                if !c.eat(b'-') {
                    break;
                }
                t.parts[i] = c.digits(2)?;
                t.end = i + 1;
            }
            if c.eat(b'T') {
                t.kind = Kind::DateTime;
                if t.end == 3 && c.bytes.get(c.at).is_some_and(u8::is_ascii_digit) {
                    t.clock(&mut c)?;
                    t.tz = Self::offset(&mut c)?;
                }
            }
        } else {
            t.kind = Kind::Time;
            t.first = 3;
            t.clock(&mut c)?;
        }
        let valid = c.at == s.len()
            && (1..=12).contains(&t.parts[1])
            && (1..=days_in_month(t.parts[0], t.parts[1])).contains(&t.parts[2])
            && t.parts[3] <= 23
            && t.parts[4] <= 59
            && t.parts[5] <= 60;
        valid.then_some(t)
    }

    fn clock(&mut self, c: &mut Cursor<'_>) -> Option<()> {
        self.parts[3] = c.digits(2)?;
        self.end = 4;
        for i in 4..6 {
            if !c.eat(b':') {
                return Some(());
            }
            self.parts[i] = c.digits(2)?;
            self.end = i + 1;
        }
        if c.eat(b'.') {
            let start = c.at;
            while c.bytes.get(c.at).is_some_and(u8::is_ascii_digit) {
                c.at += 1;
            }
            let fraction = c.bytes.get(start..c.at).filter(|f| !f.is_empty())?;
            self.parts[6] = (0..3).fold(0, |ms, i| {
                ms * 10 + fraction.get(i).map_or(0, |d| u32::from(d - b'0'))
            });
            self.end = 7;
        }
        Some(())
    }

    fn offset(c: &mut Cursor<'_>) -> Option<Option<i32>> {
        if c.eat(b'Z') {
            return Some(Some(0));
        }
        let sign = if c.eat(b'+') {
            1
        } else if c.eat(b'-') {
            -1
        } else {
            return Some(None);
        };
        let hours = c.digits(2)?;
        if !c.eat(b':') {
            return None;
        }
        let minutes = c.digits(2)?;
        if hours > 14 || minutes > 59 {
            return None;
        }
        Some(Some(sign * i32::try_from(hours * 60 + minutes).ok()?))
    }

    /// The parts compared at each FHIRPath precision (seconds and milliseconds are one), shifted
    /// to UTC when an offset is given down to the minute.
    fn levels(&self) -> Vec<i64> {
        let mut p = self.parts.map(i64::from);
        if let Some(tz) = self.tz.filter(|_| self.end >= 5) {
            let minutes =
                days_from_civil(p[0], p[1], p[2]) * 1440 + p[3] * 60 + p[4] - i64::from(tz);
            let (y, m, d) = civil_from_days(minutes.div_euclid(1440));
            let minute_of_day = minutes.rem_euclid(1440);
            p[..5].copy_from_slice(&[y, m, d, minute_of_day / 60, minute_of_day % 60]);
        }
        p[5] = p[5] * 1000 + p[6];
        p.get(self.first..self.end.min(6))
            .map(<[i64]>::to_vec)
            .unwrap_or_default()
    }

    /// FHIRPath comparison: decided by the first differing part both values have, unknown
    /// (`None`) when they agree that far but have different precisions.
    fn compare(&self, other: &Temporal) -> Option<Ordering> {
        let (a, b) = (self.levels(), other.levels());
        match a.iter().zip(&b).map(|(x, y)| x.cmp(y)).find(|o| o.is_ne()) {
            Some(ordering) => Some(ordering),
            None => (a.len() == b.len()).then_some(Ordering::Equal),
        }
    }

    /// The boundary text and type at `precision` digits (default: the finest of the kind).
    fn boundary(&self, precision: Option<i64>, high: bool) -> Option<(String, &'static str)> {
        let (default, allowed, ty): (i64, &[i64], _) = match self.kind {
            Kind::Date => (8, &[4, 6, 8], "date"),
            Kind::DateTime => (17, &[4, 6, 8, 10, 12, 14, 17], "dateTime"),
            Kind::Time => (9, &[2, 4, 6, 9], "time"),
        };
        let precision = precision.unwrap_or(default);
        let end = allowed.iter().position(|&p| p == precision)? + 1 + self.first;
        let mut parts = self.parts;
        for i in self.end..end {
            parts[i] = match (high, i) {
                (false, 1 | 2) => 1,
                (false, _) => 0,
                (true, 1) => 12,
                (true, 2) => days_in_month(parts[0], parts[1]),
                (true, 3) => 23,
                (true, 4 | 5) => 59,
                (true, _) => 999,
            };
        }
        let mut out = String::new();
        for (i, part) in parts.iter().enumerate().take(end).skip(self.first) {
            let (sep, width) = match i {
                0 => ("", 4),
                1 | 2 => ("-", 2),
                3 if self.kind == Kind::DateTime => ("T", 2),
                3 => ("", 2),
                4 | 5 => (":", 2),
                _ => (".", 3),
            };
            out.push_str(&format!("{sep}{part:0width$}"));
        }
        if self.kind == Kind::DateTime && end > 3 {
            match self.tz {
                Some(0) => out.push('Z'),
                Some(tz) => {
                    let sign = if tz < 0 { '-' } else { '+' };
                    let tz = tz.unsigned_abs();
                    out.push_str(&format!("{sign}{:02}:{:02}", tz / 60, tz % 60));
                }
                None => out.push_str(if high { "-12:00" } else { "+14:00" }),
            }
        }
        Some((out, ty))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The members `text` reads of its focus, `None` for the whole focus.
    fn read(text: &str) -> Option<Vec<String>> {
        let expr = Expression::parse(text, &constants()).expect("parses");
        let mut names = BTreeSet::new();
        expr.focus_members(&mut names)
            .then(|| names.into_iter().collect())
    }

    #[test]
    fn the_members_an_expression_reads_of_its_focus() {
        let names = |n: &[&str]| Some(n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            read("name.where(use = 'official').family.first()"),
            names(&["name"])
        );
        assert_eq!(read("getResourceKey()"), names(&["id", "resourceType"]));
        assert_eq!(read("value.ofType(Quantity).value"), names(&["value"]));
        assert_eq!(read("name.given.join(sep)"), names(&["name", "sep"]));
        assert_eq!(
            read("a[b] = -c and d.exists(e)"),
            names(&["a", "b", "c", "d"])
        );
        assert_eq!(read("birthDate.lowBoundary(p)"), names(&["birthDate", "p"]));
        assert_eq!(read("%rowIndex + 1"), names(&[]));
        assert_eq!(
            read("link.other.getReferenceKey(Patient)"),
            names(&["link"])
        );
        // The focus itself: everything may be read.
        assert_eq!(read("$this"), None);
        assert_eq!(read("exists()"), None);
        assert_eq!(read("ofType(Patient).name"), None);
        assert_eq!(read("Patient.name"), None);
        assert_eq!(read("name.exists() and $this"), None);
        // `$this.gender` is the focus's member, as `gender` is.
        assert_eq!(read("$this.gender"), names(&["gender"]));
    }

    fn constants() -> Vec<Constant> {
        let c = |name: &str, suffix: &str, value: Value| {
            Constant::new(name, suffix, &value).expect("a valid constant")
        };
        vec![
            c("month", "Date", json!("2020-01")),
            c("day", "Date", json!("2020-01-15")),
            c("feb", "Date", json!("2020-02")),
            c("later", "Date", json!("2020-02-15")),
            c("t11", "DateTime", json!("2018-01-01T16:00:00+11:00")),
            c("t12", "DateTime", json!("2018-01-01T16:00:00+12:00")),
            c("t10", "DateTime", json!("2018-01-01T15:00:00.0+10:00")),
            c("noon", "Time", json!("12:00")),
        ]
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "active": true,
            "name": [
                {"family": "Smith", "given": ["Ann", "Bo"]},
                {"family": "Jones", "given": [null, "Cy"], "_given": [{"id": "x"}, null]}
            ],
            "deceasedDateTime": "2020-02",
            "link": [
                {"other": {"reference": "Patient/p2/_history/3"}},
                {"other": {"reference": "http://example.org/fhir/Patient/p3"}},
                {"other": {"reference": "#contained"}},
                {"other": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"}},
                {"other": {"reference": "Group/g1"}}
            ],
            "extension": [{"url": "http://e/a", "valueQuantity": {"value": 3, "unit": "kg"}}]
        })
    }

    /// Evaluates `text` on [`patient`] with [`constants`], as JSON values.
    fn eval(text: &str) -> Result<Vec<Value>, String> {
        let constants = constants();
        let expr = Expression::parse(text, &constants).map_err(|e| e.to_string())?;
        let resource = patient();
        let ctx = Context {
            constants: &constants,
            row_index: 7,
        };
        let items = expr
            .evaluate(&[Item::node(&resource)], &ctx)
            .map_err(|e| e.to_string())?;
        Ok(items.into_iter().map(|i| i.value.into_owned()).collect())
    }

    fn one(text: &str) -> Value {
        match eval(text) {
            Ok(values) if values.len() == 1 => values[0].clone(),
            other => panic!("{text}: expected one value, got {other:?}"),
        }
    }

    fn empty(text: &str) {
        assert_eq!(eval(text), Ok(vec![]), "{text}");
    }

    fn parse_error(text: &str) -> String {
        match Expression::parse(text, &constants()) {
            Err(e) => e.to_string(),
            Ok(e) => panic!("{text}: parsed as {e:?}"),
        }
    }

    #[test]
    fn precedence() {
        assert_eq!(one("1 + 2 * 3"), json!(7));
        assert_eq!(one("(1 + 2) * 3"), json!(9));
        assert_eq!(one("2 - 1 - 1"), json!(0));
        assert_eq!(one("8 / 2 / 2"), json!(2.0));
        assert_eq!(one("-2 * 3"), json!(-6));
        assert_eq!(one("-1.5 + 1"), json!(-0.5));
        assert_eq!(one("true or false and false"), json!(true));
        assert_eq!(one("false and true or true"), json!(true));
        assert_eq!(one("1 + 1 = 2 and 3 > 1 + 1"), json!(true));
        assert_eq!(one("1 < 2 = true"), json!(true));
        assert_eq!(one("true xor true implies false"), json!(true));
        assert_eq!(one("name[1].given[0]"), json!("Cy"));
        empty("-name.missing");
        assert!(
            eval("-name.family")
                .unwrap_err()
                .contains("unary `-` needs a single item")
        );
    }

    #[test]
    fn three_valued_logic() {
        empty("missing and true");
        assert_eq!(one("missing and false"), json!(false));
        assert_eq!(one("missing or true"), json!(true));
        empty("missing or false");
        empty("missing xor true");
        assert_eq!(one("missing implies true"), json!(true));
        empty("missing implies false");
        assert_eq!(one("false implies missing"), json!(true));
        empty("true implies missing");
        assert_eq!(one("active.not()"), json!(false));
        empty("missing.not()");
        // A single non-boolean item counts as true; several are an error.
        assert_eq!(one("id and true"), json!(true));
        assert!(eval("name.family and true").is_err());
    }

    #[test]
    fn equality_and_comparison() {
        assert_eq!(one("1 = 1.0"), json!(true));
        assert_eq!(one("'héllo' = 'héllo'"), json!(true));
        assert_eq!(one("name.given = name.given"), json!(true));
        assert_eq!(one("name.family != 'Smith'"), json!(true));
        empty("missing = 1");
        empty("missing < 1");
        assert_eq!(one("'abc' < 'abd'"), json!(true));
        let error = eval("id < 1").expect_err("string < integer");
        assert!(
            error.contains("string and integer") && !error.contains("p1"),
            "{error}"
        );
        assert!(eval("name.family < 'x'").is_err());
    }

    #[test]
    fn dates_and_times_compare_by_precision() {
        empty("%month = %day");
        empty("%month < %day");
        assert_eq!(one("%month < %later"), json!(true));
        assert_eq!(one("%day = '2020-01-15'"), json!(true));
        assert_eq!(one("%t11 < %t10"), json!(false));
        assert_eq!(one("%t11 <= %t10"), json!(true));
        assert_eq!(one("%t12 < %t10"), json!(true));
        assert_eq!(one("deceased.ofType(dateTime) = %feb"), json!(true));
        assert!(eval("%noon < %day").is_err());
        assert!(eval("%day < 'soon'").is_err());
    }

    #[test]
    fn arithmetic_edges() {
        assert_eq!(one("0.1 + 0.2 = 0.3"), json!(true));
        assert_eq!(one("1.1 * 1.1"), json!(1.21));
        assert_eq!(one("'a' + 'b'"), json!("ab"));
        empty("1 / 0");
        empty("1 + missing");
        assert!(
            eval("9223372036854775807 + 1")
                .unwrap_err()
                .contains("overflow")
        );
        assert!(
            eval("-9223372036854775807 - 2")
                .unwrap_err()
                .contains("overflow")
        );
        assert!(eval("99999999999999999999").is_err());
        assert!(eval("true + 1").is_err());
    }

    #[test]
    fn boundaries() {
        assert_eq!(one("1.587.lowBoundary()"), json!(1.5865));
        assert_eq!(one("1.587.highBoundary(2)"), json!(1.59));
        assert_eq!(one("(-1.587).lowBoundary(2)"), json!(-1.59));
        assert_eq!(one("(-1.587).highBoundary(0)"), json!(-1.0));
        assert_eq!(one("1.lowBoundary()"), json!(0.5));
        assert_eq!(one("120.lowBoundary(2)"), json!(119.5));
        empty("1.587.lowBoundary(29)");
        empty("1.587.lowBoundary(-1)");
        assert_eq!(one("%feb.highBoundary()"), json!("2020-02-29"));
        assert_eq!(one("%month.lowBoundary(6)"), json!("2020-01"));
        assert_eq!(
            one("%t11.highBoundary()"),
            json!("2018-01-01T16:00:00.999+11:00")
        );
        assert_eq!(one("%t10.lowBoundary(8)"), json!("2018-01-01"));
        assert_eq!(
            one("deceased.ofType(dateTime).lowBoundary(10)"),
            json!("2020-02-01T00+14:00")
        );
        assert_eq!(one("%noon.highBoundary()"), json!("12:00:59.999"));
        empty("%noon.lowBoundary(8)");
        assert!(eval("id.lowBoundary()").is_err());
        assert!(eval("name.family.lowBoundary()").is_err());
    }

    #[test]
    fn paths_choices_and_functions() {
        assert_eq!(one("Patient.id"), json!("p1"));
        assert_eq!(
            eval("name.given"),
            Ok(vec![json!("Ann"), json!("Bo"), json!("Cy")])
        );
        assert_eq!(
            one("extension('http://e/a').value.ofType(Quantity).value"),
            json!(3)
        );
        assert_eq!(one("extension.value.unit"), json!("kg"));
        empty("extension.value.ofType(string)");
        assert_eq!(one("deceased.ofType(DateTime).exists()"), json!(true));
        empty("deceased.ofType(boolean)");
        assert_eq!(
            one("name.where(given.exists($this = 'Cy')).family"),
            json!("Jones")
        );
        assert_eq!(one("name.exists(family = 'Jones')"), json!(true));
        assert_eq!(one("name.where(family).count.empty()"), json!(true));
        assert_eq!(one("name.given.join(' ')"), json!("Ann Bo Cy"));
        assert_eq!(one("name.first().given.last.empty()"), json!(true));
        assert!(eval("name.join()").unwrap_err().contains("join()"));
        assert_eq!(one("%rowIndex + 1"), json!(8));
        assert_eq!(one("getResourceKey()"), json!("p1"));
        empty("name.getResourceKey()");
        assert_eq!(
            eval("link.other.getReferenceKey()"),
            Ok(vec![json!("p2"), json!("p3"), json!("g1")])
        );
        assert_eq!(
            eval("link.other.getReferenceKey(Patient)"),
            Ok(vec![json!("p2"), json!("p3")])
        );
        assert_eq!(one("name[%rowIndex - 6].family"), json!("Jones"));
        empty("name[5]");
        empty("name[-1]");
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("'open", "unterminated"),
            ("frobnicate()", "function `frobnicate()` is not supported"),
            ("first(1)", "first() takes no arguments"),
            ("where()", "where() takes a criteria argument"),
            ("join(',', ';')", "at most one argument"),
            ("ofType()", "ofType() takes a type"),
            ("ofType(Nonsense.Type)", "expected `)`"),
            ("ofType(System.Quantity)", "unknown type"),
            ("ofType(strng)", "unknown type `strng`"),
            ("1 2", "unexpected token"),
            ("@@", "date/time literals are not supported"),
            ("%undefined", "unknown constant `%undefined`"),
            ("a | b", "not supported"),
            ("a div b", "operator `div` is not supported"),
            ("$index", "`$index` is not supported"),
            ("name.", "expected a name"),
            ("(1", "expected `)`"),
            ("'\\q'", "invalid escape"),
            ("'\\u12'", "invalid \\u escape"),
            ("'\\u+123'", "invalid \\u escape"),
            ("ñame", "unexpected character 'ñ'"),
            ("/* open", "unterminated comment"),
            ("", "expected an expression"),
        ];
        for (text, expected) in cases {
            let error = parse_error(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert_eq!(one("id // a comment"), json!("p1"));
        assert_eq!(one("/* c */ `id`"), json!("p1"));
        assert_eq!(one("'\\u00e9\\n'"), json!("é\n"));
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(one(&nested(100)), json!(1));
        assert!(parse_error(&nested(MAX_DEPTH + 1)).contains("nested too deeply"));
        assert!(parse_error(&nested(100_000)).contains("nested too deeply"));
        assert!(parse_error(&"-".repeat(100_000)).contains("nested too deeply"));
        assert!(parse_error(&vec!["id"; 200].join(".")).contains("nested too deeply"));
        assert!(parse_error(&vec!["true"; 200].join(" and ")).contains("nested too deeply"));
        assert!(
            parse_error(&format!("{}1{}", "where(".repeat(200), ")".repeat(200)))
                .contains("nested too deeply")
        );
    }

    /// Random token soup must only ever produce errors, never panics.
    #[test]
    fn arbitrary_input_never_panics() {
        const PIECES: &[&str] = &[
            "name",
            ".",
            "(",
            ")",
            "[",
            "]",
            "'x'",
            "1",
            "2.5",
            "-",
            "+",
            "*",
            "/",
            "=",
            "!=",
            "<",
            ">=",
            "and",
            "or",
            "xor",
            "implies",
            "where(",
            "exists(",
            "first()",
            "not()",
            "ofType(",
            "string",
            "Quantity",
            ")",
            ",",
            "join(",
            "lowBoundary(",
            "%day",
            "%t10",
            "$this",
            "%rowIndex",
            "getReferenceKey(",
            "extension(",
            "'é'",
            "`a`",
            "\\",
            "'",
            "@",
            "9223372036854775807",
            "0",
            " ",
            "given",
            "deceased",
            "value",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let constants = constants();
        let resource = patient();
        let ctx = Context {
            constants: &constants,
            row_index: 0,
        };
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(state % 12) {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let piece = PIECES[(state >> 33) as usize % PIECES.len()];
                text.push_str(piece);
            }
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            if let Ok(expr) = Expression::parse(&text, &constants) {
                let _ = expr.evaluate(&[Item::node(&resource)], &ctx);
            }
        }
    }

    #[test]
    fn constants_are_checked() {
        let check = |suffix: &str, value: Value| Constant::new("c", suffix, &value).err();
        assert_eq!(
            check("PositiveInt", json!(0)),
            Some("must be an integer in range")
        );
        assert_eq!(check("UnsignedInt", json!(0)), None);
        assert_eq!(
            check("Integer", json!(1.5)),
            Some("must be an integer in range")
        );
        assert_eq!(
            check("Date", json!("2020-13-01")),
            Some("is not a valid date or time of its type")
        );
        assert_eq!(
            check("Date", json!("2020-01-01T10:00:00Z")),
            Some("is not a valid date or time of its type")
        );
        assert_eq!(
            check("Markdown", json!("x")),
            Some("is not a supported constant type")
        );
        assert_eq!(
            check("Boolean", json!("true")),
            Some("has the wrong JSON type")
        );
        assert_eq!(check("Code", json!(1)), Some("must be a string"));
        let big = Constant::new("c", "Integer64", &json!("9007199254740993")).map(|c| c.value);
        assert_eq!(big, Ok(json!(9_007_199_254_740_993_i64)));
    }
}
