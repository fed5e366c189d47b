//! SQL on FHIR v2 ViewDefinitions: parsing, validation and evaluation into rows.
//!
//! [`ViewDefinition::parse`] checks a definition once — its structure, column and constant names
//! (`^[A-Za-z][A-Za-z0-9_]*$`, no duplicate columns), at most one of `forEach`, `forEachOrNull`
//! and `repeat` per select, matching `unionAll` branches, and every FHIRPath expression — and
//! compiles it. [`ViewDefinition::evaluate`] then turns one resource into rows, following the
//! specification's processing algorithm: `where` filters the resource, each `select` crosses its
//! columns with its nested selects and its `unionAll`, `forEach`/`forEachOrNull`/`repeat` unnest,
//! and `%rowIndex` counts each iteration level from 0.
//!
//! Beyond the specification's algorithm, as the official test suite expects:
//! - a `collection: true` column is always a JSON array (`[]` when the path finds nothing);
//! - a `where` path must give a single boolean or nothing (nothing filters the resource out).
//!
//! Refused: unknown keys inside `select`, `column`, `where` and `constant` (a typo would otherwise
//! drop data silently), `modifierExtension` anywhere, a column producing a complex value without
//! a `type`, and `repeat` paths that return computed values or loop back onto a node being
//! traversed. Error messages name the definition's parts and expressions, never resource content.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::slice;

use serde_json::{Map, Value};
use thiserror::Error;

use super::fhirpath::{self, Constant, Context, Expression, Item};

/// How deeply `select`s and `unionAll`s may nest.
const MAX_SELECT_DEPTH: usize = 64;
/// How deeply `repeat` may descend, and how many nodes it may collect for one focus.
const MAX_REPEAT_DEPTH: usize = 128;
const MAX_REPEAT_NODES: usize = 100_000;

/// An output column, in the order rows give values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column name.
    pub name: String,
    /// The FHIR type from `column.type` (e.g. `"string"`, `"integer"`, `"dateTime"`), if given.
    pub ty: Option<String>,
    /// Whether values are JSON arrays (`column.collection`).
    pub collection: bool,
}

/// Why a ViewDefinition was refused or could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ViewError {
    /// The definition's structure is wrong at `path` (e.g. `select[0].forEach`).
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// An expression does not parse.
    #[error("{path}: cannot parse `{expression}`: {source}")]
    Syntax {
        path: String,
        expression: String,
        source: fhirpath::ParseError,
    },
    /// Two columns have the same name.
    #[error("column '{0}' is defined more than once")]
    DuplicateColumn(String),
    /// The branches of a `unionAll` produce different columns.
    #[error(
        "{path}: unionAll branches must produce the same columns, but [{first}] differs from [{other}]"
    )]
    UnionMismatch {
        path: String,
        first: String,
        other: String,
    },
    /// An expression failed on a resource.
    #[error("{path}: expression `{expression}` failed: {source}")]
    Evaluation {
        path: String,
        expression: String,
        source: fhirpath::EvalError,
    },
    /// A column without `collection: true` found several values.
    #[error(
        "column '{column}': expression `{expression}` returned {count} values but collection is not true"
    )]
    NotCollection {
        column: String,
        expression: String,
        count: usize,
    },
    /// A column found a complex value but declares no `type`.
    #[error(
        "column '{column}': expression `{expression}` returned a complex value but the column has no type"
    )]
    UntypedComplex { column: String, expression: String },
    /// A `where` path gave something other than a single boolean.
    #[error("{path}: expression `{expression}` returned {found} instead of a boolean")]
    WhereNotBoolean {
        path: String,
        expression: String,
        found: String,
    },
    /// A `repeat` path would not terminate or escaped the resource.
    #[error("{path}: repeat expression `{expression}` {problem}")]
    Repeat {
        path: String,
        expression: String,
        problem: &'static str,
    },
}

/// A parsed and validated ViewDefinition.
#[derive(Debug, Clone)]
pub struct ViewDefinition {
    name: String,
    resource: String,
    constants: Vec<Constant>,
    wheres: Vec<Located>,
    root: Select,
    columns: Vec<Column>,
}

/// An expression with where it sits in the definition, for errors.
#[derive(Debug, Clone)]
struct Located {
    expr: Expression,
    path: String,
}

impl Located {
    fn evaluate<'a>(
        &'a self,
        focus: &Item<'a>,
        ctx: &Context<'a>,
    ) -> Result<Vec<Item<'a>>, ViewError> {
        self.expr
            .evaluate(slice::from_ref(focus), ctx)
            .map_err(|source| ViewError::Evaluation {
                path: self.path.clone(),
                expression: self.expr.text().to_owned(),
                source,
            })
    }
}

#[derive(Debug, Clone)]
enum Iteration {
    None,
    ForEach(Located),
    ForEachOrNull(Located),
    Repeat(Vec<Located>),
}

#[derive(Debug, Clone)]
struct ColumnExpr {
    name: String,
    expr: Located,
    collection: bool,
    typed: bool,
}

#[derive(Debug, Clone)]
struct Select {
    iteration: Iteration,
    columns: Vec<ColumnExpr>,
    selects: Vec<Select>,
    union_all: Vec<Select>,
    /// The row `forEachOrNull` gives for an empty collection: nulls, and 0 for `%rowIndex` columns.
    null_row: Vec<Value>,
}

type Row = Vec<Value>;

impl ViewDefinition {
    /// Parses and validates a ViewDefinition resource.
    pub fn parse(definition: &Value) -> Result<Self, ViewError> {
        let def = Obj::new(definition, String::new())?;
        if def.map.contains_key("modifierExtension") {
            return Err(def.invalid("modifierExtension is not supported"));
        }
        if let Some(ty) = def.str("resourceType")?
            && ty != "ViewDefinition"
        {
            return Err(def.invalid("resourceType must be ViewDefinition"));
        }
        let resource = def
            .str("resource")?
            .ok_or_else(|| def.invalid("resource is required"))?;
        let is_type = resource.starts_with(|c: char| c.is_ascii_uppercase())
            && resource.chars().all(|c| c.is_ascii_alphabetic());
        if !is_type {
            return Err(def.invalid("resource must be a FHIR resource type"));
        }
        let name = def.str("name")?.unwrap_or_default();
        if !name.is_empty() {
            check_name(name, &def.child("name"))?;
        }
        let constants = parse_constants(&def)?;
        let mut wheres = Vec::new();
        for (path, item) in def.array("where")?.unwrap_or_default() {
            let w = Obj::new(item, path)?;
            w.check_keys(&["path", "description"])?;
            let text = w
                .str("path")?
                .ok_or_else(|| w.invalid("path is required"))?;
            wheres.push(compile(text, w.child("path"), &constants)?);
        }
        let mut selects = Vec::new();
        let mut columns = Vec::new();
        let mut null_row = Vec::new();
        for (path, item) in def
            .array("select")?
            .ok_or_else(|| def.invalid("select is required"))?
        {
            let (select, cols) = parse_select(item, path, &constants, 1)?;
            null_row.extend_from_slice(&select.null_row);
            selects.push(select);
            columns.extend(cols);
        }
        for (i, column) in columns.iter().enumerate() {
            if columns[..i].iter().any(|c| c.name == column.name) {
                return Err(ViewError::DuplicateColumn(column.name.clone()));
            }
        }
        let root = Select {
            iteration: Iteration::None,
            columns: Vec::new(),
            selects,
            union_all: Vec::new(),
            null_row,
        };
        Ok(ViewDefinition {
            name: name.to_owned(),
            resource: resource.to_owned(),
            constants,
            wheres,
            root,
            columns,
        })
    }

    /// The view's `name`, or `""` when the definition has none.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resource type the view reads.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The output columns, in row order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The top-level members of a resource that evaluating this view can read (with
    /// `resourceType`), or `None` when it may read the whole resource. A member also stands for
    /// its choice forms (see [`Expression::focus_members`]).
    pub fn resource_members(&self) -> Option<BTreeSet<String>> {
        let mut names = BTreeSet::from(["resourceType".to_owned()]);
        let known = self.wheres.iter().all(|w| w.expr.focus_members(&mut names))
            && select_members(&self.root, &mut names);
        known.then_some(names)
    }

    /// The rows `resource` contributes, each with values in [`columns`](Self::columns) order:
    /// none if it is of another type or a `where` filters it out.
    pub fn evaluate(&self, resource: &Value) -> Result<Vec<Row>, ViewError> {
        if resource.get("resourceType").and_then(Value::as_str) != Some(self.resource.as_str()) {
            return Ok(Vec::new());
        }
        let root = Item::node(resource);
        let ctx = self.context(0);
        for w in &self.wheres {
            let result = w.evaluate(&root, &ctx)?;
            let found = match result.as_slice() {
                [] => return Ok(Vec::new()),
                [item] => match *item.value {
                    Value::Bool(true) => continue,
                    Value::Bool(false) => return Ok(Vec::new()),
                    _ => format!("a {}", item.kind()),
                },
                items => format!("{} values", items.len()),
            };
            return Err(ViewError::WhereNotBoolean {
                path: w.path.clone(),
                expression: w.expr.text().to_owned(),
                found,
            });
        }
        self.rows(&self.root, &root, 0)
    }

    fn context(&self, row_index: usize) -> Context<'_> {
        Context {
            constants: &self.constants,
            row_index,
        }
    }

    /// The rows of `select` for one node, `row_index` being the enclosing level's `%rowIndex`.
    fn rows<'a>(
        &'a self,
        select: &'a Select,
        node: &Item<'a>,
        row_index: usize,
    ) -> Result<Vec<Row>, ViewError> {
        let foci = match &select.iteration {
            Iteration::None => Cow::Borrowed(slice::from_ref(node)),
            Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
                Cow::Owned(e.evaluate(node, &self.context(row_index))?)
            }
            Iteration::Repeat(paths) => {
                let mut out = Vec::new();
                self.traverse(
                    paths,
                    node,
                    &self.context(row_index),
                    &mut Vec::new(),
                    &mut out,
                )?;
                Cow::Owned(out)
            }
        };
        if foci.is_empty() && matches!(select.iteration, Iteration::ForEachOrNull(_)) {
            return Ok(vec![select.null_row.clone()]);
        }
        let mut out = Vec::new();
        for (i, focus) in foci.iter().enumerate() {
            let row_index = match select.iteration {
                Iteration::None => row_index,
                _ => i,
            };
            let ctx = self.context(row_index);
            let mut rows = vec![column_values(select, focus, &ctx)?];
            for child in &select.selects {
                rows = product(rows, self.rows(child, focus, row_index)?);
            }
            if !select.union_all.is_empty() {
                let mut union = Vec::new();
                for branch in &select.union_all {
                    union.extend(self.rows(branch, focus, row_index)?);
                }
                rows = product(rows, union);
            }
            out.extend(rows);
        }
        Ok(out)
    }

    /// Collects, depth first, every node the `repeat` paths reach from `node` (not `node` itself).
    fn traverse<'a>(
        &'a self,
        paths: &'a [Located],
        node: &Item<'a>,
        ctx: &Context<'a>,
        ancestors: &mut Vec<*const Value>,
        out: &mut Vec<Item<'a>>,
    ) -> Result<(), ViewError> {
        ancestors.push(&*node.value);
        for path in paths {
            let fail = |problem| ViewError::Repeat {
                path: path.path.clone(),
                expression: path.expr.text().to_owned(),
                problem,
            };
            for child in path.evaluate(node, ctx)? {
                let Cow::Borrowed(value) = child.value else {
                    return Err(fail("returned a computed value instead of an element"));
                };
                if ancestors.contains(&(value as *const Value)) {
                    return Err(fail("returned an element it is already traversing"));
                }
                if ancestors.len() >= MAX_REPEAT_DEPTH || out.len() >= MAX_REPEAT_NODES {
                    return Err(fail("nests too deeply or reaches too many elements"));
                }
                out.push(child.clone());
                self.traverse(paths, &child, ctx, ancestors, out)?;
            }
        }
        ancestors.pop();
        Ok(())
    }
}

/// The values of `select`'s own columns for one focus.
fn column_values<'a>(
    select: &'a Select,
    focus: &Item<'a>,
    ctx: &Context<'a>,
) -> Result<Row, ViewError> {
    let mut row = Vec::with_capacity(select.null_row.len());
    for column in &select.columns {
        let items = column.expr.evaluate(focus, ctx)?;
        let expression = || column.expr.expr.text().to_owned();
        if !column.typed && items.iter().any(|i| i.value.is_object()) {
            return Err(ViewError::UntypedComplex {
                column: column.name.clone(),
                expression: expression(),
            });
        }
        let count = items.len();
        let mut values = items.into_iter().map(|i| i.value.into_owned());
        row.push(match (column.collection, count) {
            (true, _) => Value::Array(values.collect()),
            (false, 0 | 1) => values.next().unwrap_or(Value::Null),
            (false, count) => {
                return Err(ViewError::NotCollection {
                    column: column.name.clone(),
                    expression: expression(),
                    count,
                });
            }
        });
    }
    Ok(row)
}

/// Every row of `left` joined with every row of `right`.
fn product(mut left: Vec<Row>, right: Vec<Row>) -> Vec<Row> {
    if let [single] = right.as_slice() {
        for row in &mut left {
            row.extend_from_slice(single);
        }
        return left;
    }
    let mut out = Vec::new();
    for l in &left {
        for r in &right {
            let mut row = l.clone();
            row.extend_from_slice(r);
            out.push(row);
        }
    }
    out
}

/// Parses one selection structure and returns it with the columns it produces, in order.
fn parse_select(
    value: &Value,
    path: String,
    constants: &[Constant],
    depth: usize,
) -> Result<(Select, Vec<Column>), ViewError> {
    let sel = Obj::new(value, path)?;
    if depth > MAX_SELECT_DEPTH {
        return Err(sel.invalid("selects are nested too deeply"));
    }
    sel.check_keys(&[
        "column",
        "select",
        "forEach",
        "forEachOrNull",
        "repeat",
        "unionAll",
    ])?;
    let compile_at = |key: &str| -> Result<Option<Located>, ViewError> {
        sel.str(key)?
            .map(|text| compile(text, sel.child(key), constants))
            .transpose()
    };
    let mut iterations = Vec::new();
    if let Some(e) = compile_at("forEach")? {
        iterations.push(Iteration::ForEach(e));
    }
    if let Some(e) = compile_at("forEachOrNull")? {
        iterations.push(Iteration::ForEachOrNull(e));
    }
    if let Some(paths) = sel.array("repeat")? {
        let mut compiled = Vec::new();
        for (path, item) in paths {
            let text = item
                .as_str()
                .ok_or_else(|| invalid(&path, "must be a string"))?;
            compiled.push(compile(text, path, constants)?);
        }
        iterations.push(Iteration::Repeat(compiled));
    }
    if iterations.len() > 1 {
        return Err(sel.invalid("only one of forEach, forEachOrNull and repeat may be given"));
    }
    let mut out = Vec::new();
    let mut columns = Vec::new();
    let mut null_row = Vec::new();
    for (path, item) in sel.array("column")?.unwrap_or_default() {
        let col = Obj::new(item, path)?;
        col.check_keys(&["name", "path", "description", "collection", "type", "tag"])?;
        let name = col
            .str("name")?
            .ok_or_else(|| col.invalid("name is required"))?;
        check_name(name, &col.child("name"))?;
        let text = col
            .str("path")?
            .ok_or_else(|| col.invalid("path is required"))?;
        let expr = compile(text, format!("column '{name}'"), constants)?;
        let ty = col.str("type")?;
        let collection = col.bool("collection")?.unwrap_or(false);
        col.array("tag")?;
        null_row.push(if expr.expr.is_row_index() {
            Value::from(0)
        } else {
            Value::Null
        });
        out.push(Column {
            name: name.to_owned(),
            ty: ty.map(str::to_owned),
            collection,
        });
        columns.push(ColumnExpr {
            name: name.to_owned(),
            expr,
            collection,
            typed: ty.is_some(),
        });
    }
    let mut selects = Vec::new();
    for (path, item) in sel.array("select")?.unwrap_or_default() {
        let (select, cols) = parse_select(item, path, constants, depth + 1)?;
        null_row.extend_from_slice(&select.null_row);
        selects.push(select);
        out.extend(cols);
    }
    let mut union_all = Vec::new();
    let mut union_columns: Option<Vec<Column>> = None;
    for (path, item) in sel.array("unionAll")?.unwrap_or_default() {
        let (branch, cols) = parse_select(item, path.clone(), constants, depth + 1)?;
        match &union_columns {
            None => {
                null_row.extend_from_slice(&branch.null_row);
                union_columns = Some(cols);
            }
            Some(first) if !same_columns(first, &cols) => {
                let names = |cols: &[Column]| {
                    cols.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(ViewError::UnionMismatch {
                    path,
                    first: names(first),
                    other: names(&cols),
                });
            }
            Some(_) => {}
        }
        union_all.push(branch);
    }
    out.extend(union_columns.unwrap_or_default());
    let iteration = iterations.pop().unwrap_or(Iteration::None);
    let select = Select {
        iteration,
        columns,
        selects,
        union_all,
        null_row,
    };
    Ok((select, out))
}

/// Union branches match when names, collection flags and (where both give one) types agree.
fn same_columns(a: &[Column], b: &[Column]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.name == b.name
                && a.collection == b.collection
                && (a.ty.is_none() || b.ty.is_none() || a.ty == b.ty)
        })
}

fn parse_constants(def: &Obj<'_>) -> Result<Vec<Constant>, ViewError> {
    let mut constants: Vec<Constant> = Vec::new();
    for (path, item) in def.array("constant")?.unwrap_or_default() {
        let c = Obj::new(item, path)?;
        let name = c
            .str("name")?
            .ok_or_else(|| c.invalid("name is required"))?;
        check_name(name, &c.child("name"))?;
        if name == "rowIndex" || constants.iter().any(|k| k.name == name) {
            return Err(c.invalid(&format!(
                "constant name '{name}' is reserved or already used"
            )));
        }
        let mut values = c.map.iter().filter(|(k, _)| k.starts_with("value"));
        let (key, value) = match (values.next(), values.next()) {
            (Some(v), None) => v,
            _ => return Err(c.invalid("exactly one value[x] is required")),
        };
        c.check_keys(&["name", key])?;
        let suffix = key.strip_prefix("value").unwrap_or_default();
        let constant = Constant::new(name, suffix, value)
            .map_err(|message| invalid(&c.child(key), message))?;
        constants.push(constant);
    }
    Ok(constants)
}

fn compile(text: &str, path: String, constants: &[Constant]) -> Result<Located, ViewError> {
    match Expression::parse(text, constants) {
        Ok(expr) => Ok(Located { expr, path }),
        Err(source) => Err(ViewError::Syntax {
            path,
            expression: text.to_owned(),
            source,
        }),
    }
}

/// The specification's `sql-name` rule for view, column and constant names.
fn check_name(name: &str, path: &str) -> Result<(), ViewError> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            path,
            &format!(
                "'{name}' is not a valid name (letters, digits and '_', starting with a letter)"
            ),
        ))
    }
}

fn invalid(path: &str, message: &str) -> ViewError {
    ViewError::Invalid {
        path: if path.is_empty() {
            "view definition".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

/// A JSON object of the definition and its path, with typed, error-reporting accessors.
struct Obj<'v> {
    map: &'v Map<String, Value>,
    path: String,
}

impl<'v> Obj<'v> {
    fn new(value: &'v Value, path: String) -> Result<Self, ViewError> {
        match value {
            Value::Object(map) => Ok(Obj { map, path }),
            _ => Err(invalid(&path, "must be an object")),
        }
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn invalid(&self, message: &str) -> ViewError {
        invalid(&self.path, message)
    }

    /// Refuses keys other than `allowed`, `id` and `extension`.
    fn check_keys(&self, allowed: &[&str]) -> Result<(), ViewError> {
        match self
            .map
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && *k != "id" && *k != "extension")
        {
            Some(key) => Err(invalid(&self.child(key), "is not supported here")),
            None => Ok(()),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'v str>, ViewError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(&self.child(key), "must be a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ViewError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(invalid(&self.child(key), "must be true or false")),
        }
    }

    /// A non-empty array's elements with their paths.
    fn array(&self, key: &str) -> Result<Option<Vec<(String, &'v Value)>>, ViewError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) if !items.is_empty() => Ok(Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{}[{i}]", self.child(key)), item))
                    .collect(),
            )),
            Some(_) => Err(invalid(&self.child(key), "must be a non-empty array")),
        }
    }
}

/// Adds the members of the resource `select` reads, evaluated on the resource itself: an
/// iteration's own paths, or, without one, its columns and nested selects (what an iteration
/// selects is evaluated on its items). False when it may read the whole resource.
fn select_members(select: &Select, names: &mut BTreeSet<String>) -> bool {
    match &select.iteration {
        Iteration::ForEach(path) | Iteration::ForEachOrNull(path) => path.expr.focus_members(names),
        // `repeat` evaluates its paths on the resource, then on what they reach.
        Iteration::Repeat(paths) => paths.iter().all(|p| p.expr.focus_members(names)),
        Iteration::None => {
            select
                .columns
                .iter()
                .all(|c| c.expr.expr.focus_members(names))
                && select
                    .selects
                    .iter()
                    .chain(&select.union_all)
                    .all(|s| select_members(s, names))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "name": [{"family": "Smith", "given": ["Ann"]}, {"family": "Jones"}],
            "contact": [{"name": {"family": "Doe"}}]
        })
    }

    fn view(select: Value) -> Result<ViewDefinition, ViewError> {
        ViewDefinition::parse(&json!({"resource": "Patient", "select": select}))
    }

    fn rows(select: Value) -> Result<Vec<Row>, ViewError> {
        view(select)?.evaluate(&patient())
    }

    #[test]
    fn accessors_and_column_order() {
        let definition = json!({
            "resourceType": "ViewDefinition",
            "name": "names",
            "resource": "Patient",
            "select": [
                {"column": [{"name": "id", "path": "id", "type": "id"}],
                 "unionAll": [{"column": [{"name": "n", "path": "1", "type": "integer"}]},
                              {"column": [{"name": "n", "path": "2"}]}],
                 "select": [{"column": [{"name": "given", "path": "name.given", "collection": true}]}]}
            ]
        });
        let view = ViewDefinition::parse(&definition).expect("a valid view");
        assert_eq!((view.name(), view.resource()), ("names", "Patient"));
        let names: Vec<_> = view.columns().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "given", "n"]);
        assert_eq!(view.columns()[2].ty.as_deref(), Some("integer"));
        assert!(view.columns()[1].collection);
        let expected = vec![
            vec![json!("p1"), json!(["Ann"]), json!(1)],
            vec![json!("p1"), json!(["Ann"]), json!(2)],
        ];
        assert_eq!(view.evaluate(&patient()), Ok(expected));
        assert_eq!(
            view.evaluate(&json!({"resourceType": "Observation"})),
            Ok(vec![])
        );
    }

    #[test]
    fn errors_never_show_resource_content() {
        let errors = [
            rows(json!([{"column": [{"name": "f", "path": "name.family"}]}])),
            rows(json!([{"column": [{"name": "f", "path": "name.family < 1"}]}])),
            rows(json!([{"column": [{"name": "n", "path": "name"}]}])),
            ViewDefinition::parse(&json!({
                "resource": "Patient",
                "select": [{"column": [{"name": "id", "path": "id"}]}],
                "where": [{"path": "name.family.first()"}]
            }))
            .and_then(|v| v.evaluate(&patient())),
        ];
        let expected = [
            "column 'f': expression `name.family` returned 2 values but collection is not true",
            "column 'f': expression `name.family < 1` failed: `<` needs a single item but got 2",
            "column 'n': expression `name` returned a complex value but the column has no type",
            "where[0].path: expression `name.family.first()` returned a string instead of a boolean",
        ];
        for (error, expected) in errors.into_iter().zip(expected) {
            let message = error.expect_err("an evaluation error").to_string();
            assert_eq!(message, expected);
            assert!(!message.contains("Smith") && !message.contains("p1"));
        }
    }

    #[test]
    fn for_each_or_null_gives_a_null_row_with_row_index_zero() {
        let select = json!([
            {"column": [{"name": "id", "path": "id"}]},
            {"forEachOrNull": "identifier",
             "column": [{"name": "i", "path": "%rowIndex"}, {"name": "v", "path": "value"}],
             "select": [{"forEach": "period", "column": [{"name": "j", "path": "%rowIndex"}]}]}
        ]);
        let expected = vec![vec![json!("p1"), json!(0), Value::Null, json!(0)]];
        assert_eq!(rows(select), Ok(expected));
    }

    #[test]
    fn repeat_refuses_loops_and_computed_values() {
        for (path, problem) in [
            ("$this", "already traversing"),
            ("'x'", "already traversing"),
            ("name.family.join()", "computed value"),
        ] {
            let select = json!([{"repeat": [path], "column": [{"name": "c", "path": "1"}]}]);
            let error = rows(select).expect_err("a repeat error").to_string();
            assert!(error.contains(problem), "{path}: {error}");
        }
        let select = json!([{"repeat": ["name", "contact.name"], "column": [{"name": "f", "path": "family"}]}]);
        let families: Vec<_> = rows(select).expect("rows").into_iter().flatten().collect();
        assert_eq!(families, [json!("Smith"), json!("Jones"), json!("Doe")]);
    }

    #[test]
    fn definition_errors() {
        let column = json!([{"name": "id", "path": "id"}]);
        let cases = [
            (json!([]), "select: must be a non-empty array"),
            (
                json!([{"colum": column}]),
                "select[0].colum: is not supported here",
            ),
            (
                json!([{"column": [{"name": "1d", "path": "id"}]}]),
                "'1d' is not a valid name",
            ),
            (
                json!([{"column": [{"name": "id"}]}]),
                "select[0].column[0]: path is required",
            ),
            (
                json!([{"column": column}, {"column": column}]),
                "column 'id' is defined more than once",
            ),
            (
                json!([{"forEach": "name", "repeat": ["name"], "column": column}]),
                "only one of forEach, forEachOrNull and repeat",
            ),
            (
                json!([{"column": [{"name": "id", "path": "id", "collection": "yes"}]}]),
                "collection: must be true or false",
            ),
            (
                json!([{"unionAll": [{"column": column}, {"column": [{"name": "id", "path": "id", "collection": true}]}]}]),
                "unionAll branches must produce the same columns",
            ),
            (
                json!([{"column": [{"name": "id", "path": "id", "modifierExtension": []}]}]),
                "modifierExtension: is not supported here",
            ),
        ];
        for (select, expected) in cases {
            let error = view(select.clone())
                .expect_err("an invalid view")
                .to_string();
            assert!(error.contains(expected), "{select}: {error}");
        }
        let constant = |c: Value| {
            ViewDefinition::parse(
                &json!({"resource": "Patient", "constant": [c], "select": [{"column": column}]}),
            )
            .expect_err("an invalid constant")
            .to_string()
        };
        assert!(constant(json!({"name": "rowIndex", "valueInteger": 1})).contains("reserved"));
        assert!(
            constant(json!({"name": "n", "valuePositiveInt": 0}))
                .contains("constant[0].valuePositiveInt")
        );
        assert!(
            constant(json!({"name": "n", "valueString": "a", "valueCode": "b"}))
                .contains("exactly one")
        );
        let nested = (0..100).fold(
            json!([{"column": column}]),
            |inner, _| json!([{"select": inner}]),
        );
        assert!(
            view(nested)
                .expect_err("too deep")
                .to_string()
                .contains("nested too deeply")
        );
    }
}
