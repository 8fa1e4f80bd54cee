//! The atscale tour: real servers and clients on loopback, a table of what each layer did.
//!
//! Run it with `cargo run --example tour`.

mod table;

mod deadline;
mod error;
mod heartbeat;
mod hedge;
mod metrics;
mod overload;
mod ratelimit;
mod retry;
mod vocabulary;

use atscale::core::BoxError;
use table::Section;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let prometheus = metrics::install()?;
    let sections: Vec<Section> = vec![
        deadline::run().await?,
        error::run().await?,
        heartbeat::run().await?,
        hedge::run().await?,
        overload::run().await?,
        ratelimit::run().await?,
        retry::run().await?,
        vocabulary::run().await?,
    ];
    for section in &sections {
        section.print();
    }
    metrics::snapshot(&prometheus).print();
    Ok(())
}
