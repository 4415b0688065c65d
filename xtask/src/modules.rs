//! The module graph of a crate, read from its source with syn: which module
//! uses which (through `use`, paths in code, and paths in macro arguments),
//! re-exports followed to the module that defines the item. A module may use
//! its ancestors' items (a `mod` child and its parent are one unit); any
//! other loop is an import circle, which `cargo xtask test` refuses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use petgraph::{algo::tarjan_scc, graph::DiGraph};
use proc_macro2::{TokenStream, TokenTree};
use syn::{spanned::Spanned, visit::Visit, Item, UseTree};

/// A module's path from the crate root, e.g. `["proxy", "connection"]`.
type ModPath = Vec<String>;

/// One module's file and what it declares.
#[derive(Default)]
struct Module {
    file: PathBuf,
    children: BTreeSet<String>,
    /// Names of items defined here (types, functions, constants, macros...).
    items: BTreeSet<String>,
    /// `pub use` re-exports: the name seen from outside -> the full path it stands for.
    reexports: BTreeMap<String, ModPath>,
    /// `pub use some::module::*`.
    glob_reexports: Vec<ModPath>,
    /// Every path this module (and its inline modules) names, resolved to
    /// absolute form, with the line it is on.
    uses: Vec<(ModPath, usize)>,
}

/// A use of one module by another, where it was seen.
pub struct Edge {
    pub from: String,
    pub to: String,
    pub at: String,
}

/// An import circle: its modules, and one use along each of its edges.
pub struct Cycle {
    pub modules: Vec<String>,
    pub edges: Vec<Edge>,
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "import circle between {}:", self.modules.join(", "))?;
        for edge in &self.edges {
            writeln!(f, "  {} uses {} ({})", edge.from, edge.to, edge.at)?;
        }
        Ok(())
    }
}

/// The import circles of the crate whose root file is `root` (lib.rs or main.rs).
pub fn cycles(root: &Path) -> Result<Vec<Cycle>> {
    let mut modules = BTreeMap::new();
    load(root, Vec::new(), &mut modules)?;
    let mut graph = DiGraph::<ModPath, ()>::new();
    let nodes: BTreeMap<ModPath, _> = modules.keys().map(|path| (path.clone(), graph.add_node(path.clone()))).collect();
    let mut seen_at: BTreeMap<(ModPath, ModPath), String> = BTreeMap::new();
    for (from, module) in &modules {
        for (used, line) in &module.uses {
            let Some(to) = resolve(&modules, used, 0) else { continue };
            // A module and its ancestors are one unit: a child may use its parent's items.
            if to == *from || from.starts_with(&to) {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(entry) = seen_at.entry((from.clone(), to.clone())) {
                entry.insert(format!("{}:{line}", module.file.display()));
                graph.add_edge(nodes[from], nodes[&to], ());
            }
        }
    }
    let mut found = Vec::new();
    for component in tarjan_scc(&graph) {
        if component.len() < 2 {
            continue;
        }
        let members: BTreeSet<&ModPath> = component.iter().map(|&node| &graph[node]).collect();
        let edges = seen_at
            .iter()
            .filter(|((from, to), _)| members.contains(from) && members.contains(to))
            .map(|((from, to), at)| Edge { from: display(from), to: display(to), at: at.clone() })
            .collect();
        found.push(Cycle { modules: members.iter().map(|path| display(path)).collect(), edges });
    }
    found.sort_by(|a, b| a.modules.cmp(&b.modules));
    Ok(found)
}

/// Fails, listing every circle, if the crate at `root` has any.
pub fn check(root: &Path) -> Result<()> {
    let found = cycles(root)?;
    if found.is_empty() {
        return Ok(());
    }
    let listed: String = found.iter().map(ToString::to_string).collect();
    bail!(
        "{} has {} import circle(s) between modules: a module may use its ancestors' items, nothing else may \
         loop\n{listed}",
        root.display(),
        found.len()
    )
}

fn display(path: &[String]) -> String {
    if path.is_empty() {
        "crate".into()
    } else {
        path.join("::")
    }
}

/// Parses `file` as module `path`, then its `mod` children, into `modules`.
fn load(file: &Path, path: ModPath, modules: &mut BTreeMap<ModPath, Module>) -> Result<()> {
    let source = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let parsed = syn::parse_file(&source).with_context(|| format!("parse {}", file.display()))?;
    // Children of lib.rs, main.rs and mod.rs live beside them; of x.rs, in x/.
    let dir = match file.file_stem().and_then(|stem| stem.to_str()) {
        Some("lib" | "main" | "mod") => file.parent().unwrap().to_path_buf(),
        Some(stem) => file.parent().unwrap().join(stem),
        None => bail!("{} has no file name", file.display()),
    };
    let mut module = Module { file: file.to_owned(), ..Module::default() };
    let mut files = Vec::new();
    collect(&parsed.items, &path, &path, &mut module, &mut files);
    for name in &files {
        let flat = dir.join(format!("{name}.rs"));
        let nested = dir.join(name).join("mod.rs");
        let child = if flat.exists() { flat } else { nested };
        let mut child_path = path.clone();
        child_path.push(name.clone());
        load(&child, child_path, modules)?;
    }
    modules.insert(path, module);
    Ok(())
}

/// Reads the items of a module body. `file_path` is the file's module,
/// `scope` the (possibly inline) module the items are in, for `self`/`super`.
fn collect(items: &[Item], file_path: &ModPath, scope: &ModPath, module: &mut Module, files: &mut Vec<String>) {
    // Children first: code may name a child declared further down.
    if scope == file_path {
        let declared = items.iter().filter_map(|item| match item {
            Item::Mod(declared) if declared.content.is_none() => Some(declared.ident.to_string()),
            _ => None,
        });
        module.children.extend(declared);
    }
    for item in items {
        match item {
            Item::Mod(declared) => {
                let name = declared.ident.to_string();
                match &declared.content {
                    None => files.push(name),
                    Some((_, inner)) => {
                        let mut inner_scope = scope.clone();
                        inner_scope.push(name);
                        collect(inner, file_path, &inner_scope, module, files);
                    }
                }
            }
            Item::Use(used) => {
                let public = !matches!(used.vis, syn::Visibility::Inherited);
                let mut expanded = Vec::new();
                expand_use(&used.tree, Vec::new(), &mut expanded);
                let line = used.span().start().line;
                for (segments, alias) in expanded {
                    // Uniform paths: `use child::Item` names a child module of this one.
                    let relative =
                        scope == file_path && segments.first().is_some_and(|first| module.children.contains(first));
                    let resolved = if relative {
                        Some(scope.iter().chain(&segments).cloned().collect())
                    } else {
                        absolute(scope, &segments)
                    };
                    let Some(absolute) = resolved else { continue };
                    if public && scope == file_path {
                        match alias {
                            Some(name) if name == "*" => module.glob_reexports.push(absolute.clone()),
                            Some(name) => {
                                module.reexports.insert(name, absolute.clone());
                            }
                            None => {}
                        }
                    }
                    module.uses.push((absolute, line));
                }
            }
            other => {
                if scope == file_path {
                    if let Some(name) = item_name(other) {
                        module.items.insert(name);
                    }
                }
                let mut paths = PathCollector { scope, children: &module.children, found: Vec::new() };
                paths.visit_item(other);
                module.uses.extend(paths.found);
            }
        }
    }
}

fn item_name(item: &Item) -> Option<String> {
    let ident = match item {
        Item::Const(item) => &item.ident,
        Item::Enum(item) => &item.ident,
        Item::Fn(item) => &item.sig.ident,
        Item::Macro(item) => item.ident.as_ref()?,
        Item::Static(item) => &item.ident,
        Item::Struct(item) => &item.ident,
        Item::Trait(item) => &item.ident,
        Item::TraitAlias(item) => &item.ident,
        Item::Type(item) => &item.ident,
        Item::Union(item) => &item.ident,
        _ => return None,
    };
    Some(ident.to_string())
}

/// Flattens a use tree into (path, name it is known by): `a::{b, c as d, e::*}`
/// gives `a::b` (b), `a::c` (d), `a::e` (*). `self` in a group names the group's path.
fn expand_use(tree: &UseTree, prefix: Vec<String>, out: &mut Vec<(Vec<String>, Option<String>)>) {
    match tree {
        UseTree::Path(path) => {
            let mut prefix = prefix;
            prefix.push(path.ident.to_string());
            expand_use(&path.tree, prefix, out);
        }
        UseTree::Name(name) if name.ident == "self" => {
            let alias = prefix.last().cloned();
            out.push((prefix, alias));
        }
        UseTree::Name(name) => {
            let mut path = prefix;
            path.push(name.ident.to_string());
            let alias = path.last().cloned();
            out.push((path, alias));
        }
        UseTree::Rename(rename) => {
            let mut path = prefix;
            if rename.ident != "self" {
                path.push(rename.ident.to_string());
            }
            out.push((path, Some(rename.rename.to_string())));
        }
        UseTree::Glob(_) => out.push((prefix, Some("*".into()))),
        UseTree::Group(group) => {
            for tree in &group.items {
                expand_use(tree, prefix.clone(), out);
            }
        }
    }
}

/// A path as written in `scope`, made absolute; `None` for other crates'.
fn absolute(scope: &ModPath, segments: &[String]) -> Option<ModPath> {
    let (first, rest) = segments.split_first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "self" => scope.clone(),
        "super" => {
            let mut base = scope.clone();
            base.pop()?;
            base
        }
        _ => return None,
    };
    let mut rest = rest;
    while let Some(("super", tail)) = rest.split_first().map(|(head, tail)| (head.as_str(), tail)) {
        base.pop()?;
        rest = tail;
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Paths in code (types, expressions, patterns, macro arguments) that start
/// with `crate`, `self`, `super` or a child module's name.
struct PathCollector<'a> {
    scope: &'a ModPath,
    children: &'a BTreeSet<String>,
    found: Vec<(ModPath, usize)>,
}

impl PathCollector<'_> {
    fn add(&mut self, segments: Vec<String>, line: usize) {
        let Some(first) = segments.first() else { return };
        let absolute = if self.children.contains(first) {
            let mut path = self.scope.clone();
            path.extend(segments);
            Some(path)
        } else {
            absolute(self.scope, &segments)
        };
        if let Some(path) = absolute {
            self.found.push((path, line));
        }
    }

    /// Macro arguments are tokens to syn: look for `crate::a::b`-like runs.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut index = 0;
        while index < trees.len() {
            if let TokenTree::Group(group) = &trees[index] {
                self.scan_tokens(group.stream());
                index += 1;
                continue;
            }
            let mut segments = Vec::new();
            let line = trees[index].span().start().line;
            let mut at = index;
            while let Some(TokenTree::Ident(ident)) = trees.get(at) {
                segments.push(ident.to_string());
                let is_path_sep = matches!((trees.get(at + 1), trees.get(at + 2)),
                    (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':');
                if !is_path_sep {
                    break;
                }
                at += 3;
            }
            if segments.len() > 1 {
                self.add(segments, line);
                index = at + 1;
            } else {
                index += 1;
            }
        }
    }
}

impl<'ast> Visit<'ast> for PathCollector<'_> {
    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.leading_colon.is_none() && path.segments.len() > 1 {
            let segments = path.segments.iter().map(|segment| segment.ident.to_string()).collect();
            self.add(segments, path.span().start().line);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.visit_path(&mac.path);
        self.scan_tokens(mac.tokens.clone());
    }

    // Inline modules inside items (rare) would need their own scope; items
    // nested in functions use the enclosing module's.
    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {}

    fn visit_item_use(&mut self, used: &'ast syn::ItemUse) {
        let mut expanded = Vec::new();
        expand_use(&used.tree, Vec::new(), &mut expanded);
        let line = used.span().start().line;
        for (segments, _) in expanded {
            self.add(segments, line);
        }
    }
}

/// The module a path leads to: the deepest module it names, or for an item
/// re-exported there, the module the re-export comes from.
fn resolve(modules: &BTreeMap<ModPath, Module>, path: &[String], depth: usize) -> Option<ModPath> {
    if depth > 16 {
        return None;
    }
    let mut module_path: ModPath = Vec::new();
    for segment in path {
        let module = modules.get(&module_path)?;
        if module.children.contains(segment) {
            module_path.push(segment.clone());
            continue;
        }
        if module.items.contains(segment) {
            return Some(module_path);
        }
        if let Some(target) = module.reexports.get(segment) {
            // `pub use self::x::Item`: the use of Item is a use of x.
            return resolve(modules, target, depth + 1).or(Some(module_path));
        }
        for glob in &module.glob_reexports {
            let mut candidate = glob.clone();
            candidate.push(segment.clone());
            if let Some(found) = resolve(modules, &candidate, depth + 1) {
                if &found != glob || modules.get(glob).is_some_and(|m| m.items.contains(segment)) {
                    return Some(found);
                }
            }
        }
        return Some(module_path);
    }
    Some(module_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    fn circles(files: &[(&str, &str)]) -> Vec<Vec<String>> {
        let dir = tree(files);
        cycles(&dir.path().join("lib.rs")).unwrap().into_iter().map(|cycle| cycle.modules).collect()
    }

    #[test]
    fn a_use_back_and_forth_is_a_circle() {
        let found = circles(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "use crate::b::B; pub struct A;"),
            ("b.rs", "pub struct B; fn f() -> crate::a::A { todo!() }"),
        ]);
        assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()]]);
    }

    #[test]
    fn a_circle_through_a_reexport_or_a_macro_is_found() {
        let found = circles(&[
            ("lib.rs", "mod net; mod log;"),
            ("net/mod.rs", "mod conn; pub use conn::Conn;"),
            ("net/conn.rs", "pub struct Conn; fn f() { tracing::info!(x = crate::log::LEVEL); }"),
            ("log.rs", "pub const LEVEL: u8 = 1; use crate::net::Conn;"),
        ]);
        assert_eq!(found, vec![vec!["log".to_string(), "net::conn".to_string()]]);
    }

    #[test]
    fn children_may_use_their_parents_items_and_tests_their_module() {
        let found = circles(&[
            ("lib.rs", "mod proxy; mod dns;"),
            ("proxy/mod.rs", "mod conn; pub struct Config; use conn::handle; use crate::dns::Resolver;"),
            (
                "proxy/conn.rs",
                "use super::Config; pub fn handle(_: &Config) {} #[cfg(test)] mod tests { use super::*; }",
            ),
            ("dns.rs", "pub struct Resolver;"),
        ]);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn siblings_using_each_other_through_super_are_a_circle() {
        let found = circles(&[
            ("lib.rs", "mod proxy;"),
            ("proxy/mod.rs", "mod conn; mod http;"),
            ("proxy/conn.rs", "use super::http::serve; pub fn deny() {}"),
            ("proxy/http.rs", "pub fn serve() { super::conn::deny() }"),
        ]);
        assert_eq!(found, vec![vec!["proxy::conn".to_string(), "proxy::http".to_string()]]);
    }
}
