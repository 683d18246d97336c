//! The shape of a GraphQL document, measured before anything expensive looks at it.
//!
//! Validation and execution expand fragment spreads, so a document of a few hundred bytes in
//! which each fragment spreads the next several times describes millions of fields, and
//! expanding it costs seconds of CPU before any limit refuses it. Here a document is lexed
//! once (tokens and bracket nesting, before the parser, which recurses), parsed once, then
//! measured without expanding it: each fragment's size is computed once and reused wherever
//! it is spread, so measuring costs time in proportion to the text, whatever it describes.
//! A document over any limit is refused before validation or execution sees it; one within
//! them is handed on already parsed.
//!
//! Introspection is measured apart: tools (GraphiQL, code generators) send one deep,
//! standard introspection query that the dashboards' depth limit would refuse, so fields under
//! `__schema` and `__type` have their own depth limit, and a budget for the objects their
//! lists may return (each list field counts as the largest list it can be in this schema,
//! multiplied down the path).

use std::collections::HashMap;

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection, SelectionSet};

/// What a document may be, before expansion (text) and after (what it describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentLimits {
    /// Lexical tokens in the text (punctuation, names, values).
    pub max_tokens: usize,
    /// Brackets (`{`, `(`, `[`) open at once.
    pub max_nesting: usize,
    /// Fragment definitions.
    pub max_fragments: usize,
    /// Aliased fields in the text.
    pub max_aliases: usize,
    /// Fields selected once every fragment spread is expanded, over all operations.
    pub max_selections: u64,
    /// Fields nested in fields, outside introspection.
    pub max_depth: usize,
    /// Fields nested in fields, under `__schema` or `__type`.
    pub max_introspection_depth: usize,
    /// `__schema` and `__type` fields, counted after expansion.
    pub max_introspection_fields: u64,
    /// Objects an introspection answer may hold, as estimated from its lists.
    pub max_introspection_objects: u64,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        DocumentLimits {
            max_tokens: 4_000,
            max_nesting: 64,
            max_fragments: 64,
            max_aliases: 64,
            max_selections: 5_000,
            max_depth: 12,
            max_introspection_depth: 20,
            max_introspection_fields: 2,
            // The standard introspection query (graphql-js) is estimated at about 1.2 million.
            max_introspection_objects: 2_000_000,
        }
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("the document has more than {limit} tokens")]
    TooManyTokens { limit: usize },
    #[error("the document nests brackets more than {limit} deep")]
    TooNested { limit: usize },
    #[error("{0}")]
    Syntax(String),
    #[error("the document defines {count} fragments; at most {limit} are allowed")]
    TooManyFragments { count: usize, limit: usize },
    #[error("the document has at least {count} aliases; at most {limit} are allowed")]
    TooManyAliases { count: usize, limit: usize },
    #[error("fragment `{0}` spreads itself")]
    FragmentCycle(String),
    #[error("the document selects more than {limit} fields once its fragments are expanded; ask for less or split it")]
    TooLarge { limit: u64 },
    #[error("the document nests fields {depth} deep; at most {limit} are allowed")]
    TooDeep { depth: usize, limit: usize },
    #[error("introspection is nested {depth} deep; at most {limit} are allowed")]
    IntrospectionTooDeep { depth: usize, limit: usize },
    #[error("the document asks for `__schema` or `__type` at least {count} times; at most {limit} per request")]
    TooMuchIntrospection { count: u64, limit: u64 },
    #[error("the introspection answer could hold more than {limit} objects; ask for less")]
    IntrospectionTooLarge { limit: u64 },
}

impl DocumentError {
    /// The `extensions.code` of the GraphQL error.
    pub fn code(&self) -> &'static str {
        match self {
            DocumentError::Syntax(_) => "GRAPHQL_PARSE_FAILED",
            DocumentError::FragmentCycle(_) => "GRAPHQL_VALIDATION_FAILED",
            _ => "QUERY_TOO_COMPLEX",
        }
    }
}

/// A document within the limits, parsed, with what it was measured at.
#[derive(Debug)]
pub struct CheckedDocument {
    pub document: ExecutableDocument,
    /// Fields selected once fragments are expanded, over all operations.
    pub selections: u64,
    /// Deepest nesting of fields outside introspection.
    pub depth: usize,
    /// True when the document asks for `__schema` or `__type`.
    pub introspection: bool,
}

/// Lexes, parses and measures `source`; see the module documentation.
pub fn check_document(source: &str, limits: &DocumentLimits) -> Result<CheckedDocument, DocumentError> {
    scan(source, limits)?;
    let document = async_graphql::parser::parse_query(source).map_err(|e| DocumentError::Syntax(e.to_string()))?;
    if document.fragments.len() > limits.max_fragments {
        return Err(DocumentError::TooManyFragments {
            count: document.fragments.len(),
            limit: limits.max_fragments,
        });
    }
    let mut measure = Measure {
        document: &document,
        fragments: HashMap::new(),
        limits,
    };
    let mut total = Size::default();
    let operations: Vec<&SelectionSet> = match &document.operations {
        DocumentOperations::Single(operation) => vec![&operation.node.selection_set.node],
        DocumentOperations::Multiple(operations) => operations.values().map(|o| &o.node.selection_set.node).collect(),
    };
    for set in operations {
        let size = measure.selection_set(set, &mut Vec::new())?;
        total = total.beside(size);
        if total.selections > limits.max_selections {
            return Err(DocumentError::TooLarge {
                limit: limits.max_selections,
            });
        }
    }
    if total.depth > limits.max_depth {
        return Err(DocumentError::TooDeep {
            depth: total.depth,
            limit: limits.max_depth,
        });
    }
    if total.introspection_depth > limits.max_introspection_depth {
        return Err(DocumentError::IntrospectionTooDeep {
            depth: total.introspection_depth,
            limit: limits.max_introspection_depth,
        });
    }
    if total.introspection_fields > limits.max_introspection_fields {
        return Err(DocumentError::TooMuchIntrospection {
            count: total.introspection_fields,
            limit: limits.max_introspection_fields,
        });
    }
    if total.introspection_objects > limits.max_introspection_objects {
        return Err(DocumentError::IntrospectionTooLarge {
            limit: limits.max_introspection_objects,
        });
    }
    Ok(CheckedDocument {
        selections: total.selections,
        depth: total.depth,
        introspection: total.introspection_fields > 0,
        document,
    })
}

/// One pass over the text: counts tokens and bracket nesting, and the aliases and
/// `__schema` / `__type` fields the text spells out (each is a lower bound of what the parsed
/// document holds), stopping at the first limit passed. What it does not recognise counts as
/// a token; the parser reports it. A document refused here costs no parsing: the parser is
/// the expensive part of refusing a large one.
fn scan(source: &str, limits: &DocumentLimits) -> Result<(), DocumentError> {
    let bytes = source.as_bytes();
    let (mut at, mut tokens) = (0, 0usize);
    // Open brackets, innermost last, and how many of them are parentheses: a name followed by
    // `:` is an alias only in a selection set, where no parenthesis is open (arguments,
    // variable definitions and object values all sit inside one).
    let mut open: Vec<u8> = Vec::new();
    let mut parentheses = 0usize;
    let (mut aliases, mut introspection) = (0usize, 0u64);
    let mut after_name = false;
    let name_byte = |b: u8| b == b'_' || b.is_ascii_alphanumeric();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let mut name = false;
        match rest[0] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                at += 1;
                continue;
            }
            0xEF if rest.starts_with(&[0xEF, 0xBB, 0xBF]) => {
                at += 3;
                continue;
            }
            b'#' => {
                at += rest
                    .iter()
                    .position(|&b| b == b'\n' || b == b'\r')
                    .unwrap_or(rest.len());
                continue;
            }
            bracket @ (b'{' | b'(' | b'[') => {
                if open.len() >= limits.max_nesting {
                    return Err(DocumentError::TooNested {
                        limit: limits.max_nesting,
                    });
                }
                open.push(bracket);
                parentheses += usize::from(bracket == b'(');
                at += 1;
            }
            b'}' | b')' | b']' => {
                if open.pop() == Some(b'(') {
                    parentheses -= 1;
                }
                at += 1;
            }
            b':' => {
                if after_name && parentheses == 0 && open.last() == Some(&b'{') {
                    aliases += 1;
                    if aliases > limits.max_aliases {
                        return Err(DocumentError::TooManyAliases {
                            count: aliases,
                            limit: limits.max_aliases,
                        });
                    }
                }
                at += 1;
            }
            b'"' if rest.starts_with(b"\"\"\"") => at += 3 + block_string_length(&rest[3..]),
            b'"' => at += 1 + string_length(&rest[1..]),
            b'.' if rest.starts_with(b"...") => at += 3,
            b if b == b'_' || b.is_ascii_alphabetic() => {
                let length = rest.iter().position(|&b| !name_byte(b)).unwrap_or(rest.len());
                if parentheses == 0 && matches!(&rest[..length], b"__schema" | b"__type") {
                    introspection += 1;
                    if introspection > limits.max_introspection_fields {
                        return Err(DocumentError::TooMuchIntrospection {
                            count: introspection,
                            limit: limits.max_introspection_fields,
                        });
                    }
                }
                name = true;
                at += length;
            }
            b if b == b'-' || b.is_ascii_digit() => {
                at += 1 + rest[1..]
                    .iter()
                    .position(|&b| !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')))
                    .unwrap_or(rest.len() - 1);
            }
            _ => at += 1,
        }
        after_name = name;
        tokens += 1;
        if tokens > limits.max_tokens {
            return Err(DocumentError::TooManyTokens {
                limit: limits.max_tokens,
            });
        }
    }
    Ok(())
}

/// Bytes of a string's body and closing quote (or to the end of the line if unterminated).
fn string_length(body: &[u8]) -> usize {
    let mut at = 0;
    while at < body.len() {
        match body[at] {
            b'\\' => at += 2,
            b'"' => return at + 1,
            b'\n' | b'\r' => return at,
            _ => at += 1,
        }
    }
    body.len()
}

/// Bytes of a block string's body and closing `"""` (`\"""` does not close it).
fn block_string_length(body: &[u8]) -> usize {
    let mut at = 0;
    while at < body.len() {
        if body[at..].starts_with(b"\\\"\"\"") {
            at += 4;
        } else if body[at..].starts_with(b"\"\"\"") {
            return at + 3;
        } else {
            at += 1;
        }
    }
    body.len()
}

/// What a selection set describes once expanded. Context-free, so a fragment's is computed
/// once, wherever it is spread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Size {
    selections: u64,
    /// Estimated objects of the answer: each list field multiplied by the largest list it
    /// can be (only introspection lists are known here; the data fields' page sizes are the
    /// complexity limit's business).
    objects: u64,
    /// Deepest nesting of fields not under introspection.
    depth: usize,
    /// Deepest nesting of fields through a `__schema` or `__type` field.
    introspection_depth: usize,
    introspection_fields: u64,
    /// Estimated objects of introspection answers (lists multiplied down the path).
    introspection_objects: u64,
}

impl Size {
    /// Two selections side by side.
    fn beside(self, other: Size) -> Size {
        Size {
            selections: self.selections.saturating_add(other.selections),
            objects: self.objects.saturating_add(other.objects),
            depth: self.depth.max(other.depth),
            introspection_depth: self.introspection_depth.max(other.introspection_depth),
            introspection_fields: self.introspection_fields.saturating_add(other.introspection_fields),
            introspection_objects: self.introspection_objects.saturating_add(other.introspection_objects),
        }
    }
}

/// The largest list an introspection field can return in this schema (with room to grow):
/// the factor its objects are multiplied by.
fn introspection_list_factor(name: &str) -> u64 {
    match name {
        "types" => 64,
        "fields" | "inputFields" | "enumValues" => 32,
        "args" | "directives" => 16,
        "interfaces" | "possibleTypes" => 8,
        _ => 1,
    }
}

struct Measure<'d> {
    document: &'d ExecutableDocument,
    /// Fragments measured so far.
    fragments: HashMap<&'d str, Size>,
    limits: &'d DocumentLimits,
}

impl<'d> Measure<'d> {
    /// `spreading` holds the fragments being measured further up: spreading one again is a
    /// cycle.
    fn selection_set(&mut self, set: &'d SelectionSet, spreading: &mut Vec<&'d str>) -> Result<Size, DocumentError> {
        let mut total = Size::default();
        for item in &set.items {
            let size = match &item.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    let children = self.selection_set(&field.selection_set.node, spreading)?;
                    let name = field.name.node.as_str();
                    let selections = children.selections.saturating_add(1);
                    if matches!(name, "__schema" | "__type") {
                        let objects = children.objects.saturating_add(1);
                        Size {
                            selections,
                            objects,
                            depth: 1,
                            introspection_depth: 1 + children.depth.max(children.introspection_depth),
                            introspection_fields: children.introspection_fields.saturating_add(1),
                            introspection_objects: children.introspection_objects.saturating_add(objects),
                        }
                    } else {
                        Size {
                            selections,
                            objects: introspection_list_factor(name).saturating_mul(children.objects.saturating_add(1)),
                            depth: 1 + children.depth,
                            introspection_depth: if children.introspection_depth > 0 {
                                1 + children.introspection_depth
                            } else {
                                0
                            },
                            introspection_fields: children.introspection_fields,
                            introspection_objects: children.introspection_objects,
                        }
                    }
                }
                Selection::InlineFragment(fragment) => {
                    self.selection_set(&fragment.node.selection_set.node, spreading)?
                }
                Selection::FragmentSpread(spread) => {
                    self.fragment(spread.node.fragment_name.node.as_str(), spreading)?
                }
            };
            total = total.beside(size);
            if total.selections > self.limits.max_selections {
                return Err(DocumentError::TooLarge {
                    limit: self.limits.max_selections,
                });
            }
        }
        Ok(total)
    }

    fn fragment(&mut self, name: &'d str, spreading: &mut Vec<&'d str>) -> Result<Size, DocumentError> {
        if let Some(size) = self.fragments.get(name) {
            return Ok(*size);
        }
        if spreading.contains(&name) {
            return Err(DocumentError::FragmentCycle(name.to_owned()));
        }
        // An unknown fragment is validation's to report; it describes nothing.
        let Some((key, definition)) = self.document.fragments.get_key_value(name) else {
            return Ok(Size::default());
        };
        spreading.push(key.as_str());
        let size = self.selection_set(&definition.node.selection_set.node, spreading);
        spreading.pop();
        let size = size?;
        self.fragments.insert(key.as_str(), size);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(source: &str) -> Result<CheckedDocument, DocumentError> {
        check_document(source, &DocumentLimits::default())
    }

    /// Nine fragments, each spreading the next `fan` times: `fan^9` fields in a few hundred
    /// bytes.
    fn exponential(fan: usize) -> String {
        let mut text = String::from("{ ...F0 }\n");
        for level in 0..9 {
            let spreads = format!("...F{} ", level + 1).repeat(fan);
            text.push_str(&format!("fragment F{level} on Query {{ {spreads} }}\n"));
        }
        text.push_str("fragment F9 on Query { projectionStatus { name } }\n");
        text
    }

    #[test]
    fn fragment_expansion_is_measured_without_expanding() {
        let started = std::time::Instant::now();
        let error = check(&exponential(8)).unwrap_err();
        assert!(matches!(error, DocumentError::TooLarge { .. }), "{error}");
        assert_eq!(error.code(), "QUERY_TOO_COMPLEX");
        assert!(
            started.elapsed() < std::time::Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        // The same shape, small enough, passes with its expanded size.
        let small = check(&exponential(1)).unwrap();
        assert_eq!(small.selections, 2);
        assert_eq!(small.depth, 2);
    }

    #[test]
    fn cycles_tokens_nesting_fragments_and_aliases_are_refused() {
        let cycle = "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
        assert!(matches!(check(cycle), Err(DocumentError::FragmentCycle(_))));
        let many = format!("{{ {} }}", "projectionStatus { name } ".repeat(2_000));
        assert!(matches!(check(&many), Err(DocumentError::TooManyTokens { .. })));
        let nested = format!("{}{}", "{ a ".repeat(100), "}".repeat(100));
        assert!(matches!(check(&nested), Err(DocumentError::TooNested { .. })));
        let list = format!("{{ a(x: {}1{}) }}", "[".repeat(100), "]".repeat(100));
        assert!(matches!(check(&list), Err(DocumentError::TooNested { .. })));
        let fragments: String = (0..70).map(|i| format!("fragment F{i} on Query {{ a }} ")).collect();
        assert!(matches!(
            check(&format!("{{ a }} {fragments}")),
            Err(DocumentError::TooManyFragments { count: 70, .. })
        ));
        // Refused at the first alias over the limit, before parsing.
        let aliases: String = (0..70).map(|i| format!("a{i}: a ")).collect();
        assert!(matches!(
            check(&format!("{{ {aliases} }}")),
            Err(DocumentError::TooManyAliases { count: 65, .. })
        ));
        // Arguments, variables, object values and default values are not aliases.
        let arguments: String = (0..70).map(|i| format!("a{i}(x: {{y: 1}}, z: 2) ")).collect();
        assert!(check(&format!("query Q($v: Int = 1, $w: [Int] = [1]) {{ {arguments} }}")).is_ok());
        let spread: String = (0..70).map(|i| format!("f{i}: a ")).collect();
        assert!(matches!(
            check(&format!("{{ ...F }} fragment F on Query {{ {spread} }}")),
            Err(DocumentError::TooManyAliases { .. })
        ));
        assert!(matches!(check("{ a "), Err(DocumentError::Syntax(_))));
        // Strings, block strings and comments hide no tokens or brackets.
        assert!(check("# {{{{{{ \n{ a(x: \"{{{[[[\\\"\", y: \"\"\"{{{ \\\"\"\" ]]]\"\"\") }").is_ok());
    }

    #[test]
    fn depth_counts_through_fragments_and_introspection_has_its_own_limits() {
        let deep = format!("{{ {}x{} }}", "a { ".repeat(13), " }".repeat(13));
        assert!(matches!(check(&deep), Err(DocumentError::TooDeep { depth: 14, .. })));
        let through =
            "{ a { ...F } } fragment F on T { b { c { d { e { f { g { h { i { j { k { l { m } } } } } } } } } } } }";
        assert!(matches!(check(through), Err(DocumentError::TooDeep { depth: 13, .. })));
        let schema = format!("{{ __schema {{ {}name{} }} }}", "a { ".repeat(16), " }".repeat(16));
        assert!(check(&schema).unwrap().introspection);
        let too_deep = format!("{{ __schema {{ {}name{} }} }}", "a { ".repeat(20), " }".repeat(20));
        assert!(matches!(
            check(&too_deep),
            Err(DocumentError::IntrospectionTooDeep { .. })
        ));
        let aliased =
            "{ a: __schema { types { name } } b: __schema { types { name } } c: __schema { types { name } } }";
        assert!(matches!(
            check(aliased),
            Err(DocumentError::TooMuchIntrospection { count: 3, .. })
        ));
        // Spelled out once, asked three times: counted after expansion too.
        let spread =
            "{ ...F } fragment F on Query { ...G ...G ...G } fragment G on Query { __schema { queryType { name } } }";
        assert!(matches!(
            check(spread),
            Err(DocumentError::TooMuchIntrospection { count: 3, .. })
        ));
        // Lists of lists of lists: fields of the types of fields of the types of fields.
        let multiplying =
            "{ __schema { types { fields { type { fields { type { fields { type { fields { name } } } } } } } } } }";
        assert!(matches!(
            check(multiplying),
            Err(DocumentError::IntrospectionTooLarge { .. })
        ));
    }
}
