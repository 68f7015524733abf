//! `config/<component>.env` is the reference of every environment variable a component reads
//! (docs point operators at it). Each variable a flag of `spendguard ledger`, `sidecar`,
//! `operator` or `worker …` takes must appear there, so a new flag cannot ship undocumented.

use clap::{Args, Command};

/// The environment variables of every flag of `A`.
fn env_vars<A: Args>() -> Vec<String> {
    A::augment_args(Command::new("component"))
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

fn assert_listed(file: &str, vars: &[String]) {
    let path = format!("{}/config/{file}", spendguard_testkit::paths::REPO_ROOT);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    let missing: Vec<&String> = vars
        .iter()
        .filter(|var| !listed.contains(&var.as_str()))
        .collect();
    assert!(missing.is_empty(), "{file} does not list {missing:?}");
}

#[test]
fn every_environment_variable_is_in_its_reference_file() {
    assert_listed("ledger.env", &env_vars::<spendguard_ledger::LedgerArgs>());
    assert_listed(
        "sidecar.env",
        &env_vars::<spendguard_sidecar::SidecarArgs>(),
    );
    assert_listed(
        "operator.env",
        &env_vars::<spendguard_operator::OperatorArgs>(),
    );
    let mut workers = env_vars::<spendguard_workers::ForwarderArgs>();
    workers.extend(env_vars::<spendguard_workers::SweeperArgs>());
    assert_listed("workers.env", &workers);
}

#[test]
fn every_variable_the_chart_sets_is_one_a_component_reads() {
    // A misspelt variable in a template would be ignored silently and its setting lost. The
    // reference files list exactly what the components read (checked above).
    let root = spendguard_testkit::paths::REPO_ROOT;
    let mut known = String::new();
    for file in ["ledger.env", "sidecar.env", "operator.env", "workers.env"] {
        known += &std::fs::read_to_string(format!("{root}/config/{file}")).unwrap();
    }
    let known: Vec<&str> = known
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    let templates = std::fs::read_dir(format!("{root}/charts/spendguard/templates")).unwrap();
    let mut checked = 0;
    for template in templates {
        let path = template.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for name in text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("- name: "))
            .filter(|name| name.starts_with("SPENDGUARD_") || name.starts_with("POD_"))
        {
            assert!(
                known.contains(&name),
                "{} sets {name}, which no component reads",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} variables found in the chart");
}
