//! `membrane translate -f INGRESS.yaml`: the CECs Membrane would write, with
//! no running instance and no I/O beyond reading the file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use membrane_store::Object;
use membrane_store::k8s_openapi::api::networking::v1::Ingress;

use super::read_input;

pub fn run(
    file: &Path,
    default_lb_mode: membrane_ingress::LoadBalancerMode,
    ingress: &membrane_operator::IngressOptions,
) -> Result<ExitCode> {
    let text = read_input(file)?;
    let ingresses: Vec<Ingress> = membrane_store::parse_documents(&text)?
        .into_iter()
        .filter_map(|o| match o {
            Object::Ingress(i) => Some(i),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        !ingresses.is_empty(),
        "{}: no Ingress found",
        file.display()
    );
    // The same options `membrane up` takes, so a preview matches what runs.
    let opts = ingress.apply(membrane_ingress::TranslateOptions {
        default_lb_mode,
        ..membrane_ingress::TranslateOptions::default()
    });
    // Dedicated Ingresses each get their own CEC; shared ones are merged into
    // the one shared CEC, exactly as the running controller does.
    let result = membrane_ingress::translate_cluster(&ingresses, &opts);
    for r in &result.rejected {
        eprintln!("error: {}", r.error);
    }
    print!("{}", membrane_ingress::cecs_to_yaml(&result.cecs())?);
    Ok(if result.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
