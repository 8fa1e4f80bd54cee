//! Printing the tour's sections as readable tables.

/// One layer's part of the tour: a title, a one-line explanation, and rows of
/// "what we did" / "what the layer did".
pub(crate) struct Section {
    pub(crate) title: &'static str,
    pub(crate) about: &'static str,
    pub(crate) rows: Vec<(String, String)>,
}

impl Section {
    pub(crate) fn new(title: &'static str, about: &'static str) -> Self {
        Section {
            title,
            about,
            rows: Vec::new(),
        }
    }

    /// Adds a row: what the tour did, and what came back.
    pub(crate) fn row(&mut self, what: impl Into<String>, outcome: impl Into<String>) {
        self.rows.push((what.into(), outcome.into()));
    }

    pub(crate) fn print(&self) {
        let left = self
            .rows
            .iter()
            .map(|(w, _)| w.chars().count())
            .max()
            .unwrap_or(0)
            .max(4);
        let right = self
            .rows
            .iter()
            .map(|(_, o)| o.chars().count())
            .max()
            .unwrap_or(0)
            .max(7);
        println!();
        println!("== {} ==", self.title);
        println!("{}", self.about);
        println!("+-{}-+-{}-+", "-".repeat(left), "-".repeat(right));
        println!("| {:left$} | {:right$} |", "what", "outcome");
        println!("+-{}-+-{}-+", "-".repeat(left), "-".repeat(right));
        for (what, outcome) in &self.rows {
            println!("| {what:left$} | {outcome:right$} |");
        }
        println!("+-{}-+-{}-+", "-".repeat(left), "-".repeat(right));
    }
}
