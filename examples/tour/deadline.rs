//! The deadline part of the tour (filled in with the Deadline layer).

use atscale::core::BoxError;

use crate::table::Section;

pub async fn run() -> Result<Section, BoxError> {
    Ok(Section::new("Deadline", "in progress"))
}
