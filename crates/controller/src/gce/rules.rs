//! The pure rules of driving a managed instance group (research file gcp.md §1, §4.5): which
//! MIG settings delete or replace busy VMs, how Compute's answers are classified, and what a
//! managed instance's `currentAction`/`instanceStatus` mean for the scaler. No I/O.

use crate::provider::InstanceStatus;
use serde_json::Value;

/// An autohealing initial delay shorter than this can repair (recreate) a VM that is still
/// booting its agent and runner.
pub const MIN_AUTOHEAL_DELAY_SECS: i64 = 300;

/// A MIG setting that deletes or replaces busy VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingProblem {
    /// The setting, as the API names it.
    pub setting: &'static str,
    /// What it is now.
    pub found: String,
    /// What it does to runners, and how to fix it.
    pub fix: &'static str,
}

/// The settings of an `InstanceGroupManager` (as `get` returns it) and of its autoscaler
/// (`None`: none attached, or not read) that can delete or replace a VM running a job.
pub fn check_settings(
    igm: &Value,
    autoscaler: Option<&Value>,
    regional: bool,
) -> Vec<SettingProblem> {
    let mut out = Vec::new();
    let attached = igm["status"]["autoscaler"]
        .as_str()
        .is_some_and(|s| !s.is_empty());
    if attached {
        let mode = autoscaler
            .and_then(|a| a["autoscalingPolicy"]["mode"].as_str())
            .unwrap_or("ON");
        if !matches!(mode, "OFF" | "ONLY_SCALE_OUT" | "ONLY_UP") {
            out.push(SettingProblem {
                setting: "autoscaler.autoscalingPolicy.mode",
                found: mode.to_owned(),
                fix: "an autoscaler that scales in picks which VMs die, busy ones included: delete the autoscaler (the controller owns the size) or set its mode to ONLY_SCALE_OUT",
            });
        }
    }
    let policy = &igm["updatePolicy"];
    if regional {
        let redistribution = policy["instanceRedistributionType"]
            .as_str()
            .unwrap_or("PROACTIVE");
        if redistribution != "NONE" {
            out.push(SettingProblem {
                setting: "updatePolicy.instanceRedistributionType",
                found: redistribution.to_owned(),
                fix: "a regional MIG rebalancing its zones deletes running VMs: set it to NONE",
            });
        }
    }
    let update = policy["type"].as_str().unwrap_or("PROACTIVE");
    if update == "PROACTIVE" {
        out.push(SettingProblem {
            setting: "updatePolicy.type",
            found: if policy["type"].is_string() {
                update.to_owned()
            } else {
                "not set (PROACTIVE)".to_owned()
            },
            fix: "a proactive update replaces VMs, busy ones included, when the template changes: set it to OPPORTUNISTIC (the controller rolls VMs over by draining them)",
        });
    }
    for healing in igm["autoHealingPolicies"].as_array().into_iter().flatten() {
        let delay = healing["initialDelaySec"].as_i64().unwrap_or(0);
        if delay < MIN_AUTOHEAL_DELAY_SECS {
            out.push(SettingProblem {
                setting: "autoHealingPolicies[].initialDelaySec",
                found: delay.to_string(),
                fix: "autohealing with a short initial delay recreates VMs still booting their runner: give it at least 300 s (or remove the health check)",
            });
        }
    }
    out
}

/// How a failed Compute call should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A rate quota (403 `rateLimitExceeded`, 429, "Quota exceeded ... per minute"): wait for
    /// the next minute.
    RateLimited,
    /// Too many operations in flight, an operation in progress, 5xx, a timeout: try again.
    Transient,
    /// 401: the access token is not (or no longer) good.
    Unauthorized,
    NotFound,
    /// Anything else: someone must change something (a permission, a name, a setting).
    Fatal,
}

/// Classifies a Compute error answer (`status` and the JSON body, `{"error": {"code",
/// "message", "errors": [{"reason", ...}], "details": [...]}}`).
pub fn classify(status: u16, body: &Value) -> Failure {
    let e = &body["error"];
    let message = e["message"].as_str().unwrap_or_default();
    let reasons: Vec<&str> = e["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["reason"].as_str())
        .chain(
            e["details"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["reason"].as_str()),
        )
        .collect();
    let has = |r: &str| reasons.iter().any(|x| x.eq_ignore_ascii_case(r));
    match status {
        429 => Failure::RateLimited,
        403 if has("rateLimitExceeded")
            || has("RATE_LIMIT_EXCEEDED")
            || (message.contains("Quota exceeded for quota metric")
                && message.contains("per minute")) =>
        {
            Failure::RateLimited
        }
        403 if has("CONCURRENT_OPERATIONS_QUOTA_EXCEEDED") => Failure::Transient,
        409 if message.contains("operationInProgress") || has("operationInProgress") => {
            Failure::Transient
        }
        400 if has("resourceNotReady") => Failure::Transient,
        401 => Failure::Unauthorized,
        404 => Failure::NotFound,
        408 | 500 | 502 | 503 | 504 => Failure::Transient,
        _ => Failure::Fatal,
    }
}

/// A managed instance (an element of `listManagedInstances`) as the scaler sees it.
pub fn instance_status(mi: &Value) -> InstanceStatus {
    let action = mi["currentAction"].as_str().unwrap_or("NONE");
    let status = mi["instanceStatus"].as_str().unwrap_or_default();
    match action {
        "DELETING" | "ABANDONING" => return InstanceStatus::Stopping,
        "CREATING" | "CREATING_WITHOUT_RETRIES" | "RECREATING" => return InstanceStatus::Creating,
        _ => {}
    }
    match status {
        "RUNNING" => InstanceStatus::Running,
        "" | "PROVISIONING" | "STAGING" | "PENDING" | "REPAIRING" => InstanceStatus::Creating,
        "STOPPING" | "PENDING_STOP" | "SUSPENDING" | "DEPROVISIONING" => InstanceStatus::Stopping,
        // STOPPED, TERMINATED, SUSPENDED: not running on its own.
        _ => InstanceStatus::Stopped,
    }
}

/// Why a MIG cannot create a VM, from its `lastAttempt` errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateTrouble {
    /// The zone has no capacity of this shape (a stock-out): the MIG keeps trying.
    StockOut(String),
    /// A resource quota (CPUs, addresses) is spent.
    Quota(String),
    Other(String),
}

/// The trouble a managed instance's last create attempt reports, if any.
pub fn create_trouble(mi: &Value) -> Option<CreateTrouble> {
    let errors = mi["lastAttempt"]["errors"]["errors"].as_array()?;
    let first = errors.first()?;
    let code = first["code"].as_str().unwrap_or_default();
    let message = format!("{code}: {}", first["message"].as_str().unwrap_or_default());
    Some(
        if code.contains("RESOURCE_POOL_EXHAUSTED") || code.contains("STOCKOUT") {
            CreateTrouble::StockOut(message)
        } else if code.contains("QUOTA") {
            CreateTrouble::Quota(message)
        } else {
            CreateTrouble::Other(message)
        },
    )
}

/// Is `name` a valid Compute instance name (RFC 1035: 1–63 of `[a-z0-9-]`, a letter first,
/// no `-` last)?
pub fn valid_instance_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.last().is_some_and(|c| *c != b'-')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The instance name part of a resource URL (`.../zones/Z/instances/NAME`) or a bare name.
pub fn name_of(url_or_name: &str) -> &str {
    url_or_name.rsplit('/').next().unwrap_or(url_or_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(igm: Value, autoscaler: Option<Value>, regional: bool) -> Vec<&'static str> {
        check_settings(&igm, autoscaler.as_ref(), regional)
            .iter()
            .map(|p| p.setting)
            .collect()
    }

    fn safe() -> Value {
        json!({"updatePolicy": {"type": "OPPORTUNISTIC", "instanceRedistributionType": "NONE"},
               "autoHealingPolicies": [{"healthCheck": "hc", "initialDelaySec": 600}]})
    }

    #[test]
    fn a_safe_mig_has_no_problem() {
        assert!(settings(safe(), None, true).is_empty());
        assert!(settings(safe(), None, false).is_empty());
    }

    #[test]
    fn an_autoscaler_that_scales_in_is_a_problem() {
        let mut igm = safe();
        igm["status"] = json!({"autoscaler": "https://www.googleapis.com/compute/v1/projects/p/zones/z/autoscalers/a"});
        assert_eq!(
            settings(igm.clone(), None, false),
            ["autoscaler.autoscalingPolicy.mode"]
        );
        let on = json!({"autoscalingPolicy": {"mode": "ON"}});
        assert_eq!(
            settings(igm.clone(), Some(on), false),
            ["autoscaler.autoscalingPolicy.mode"]
        );
        let out_only = json!({"autoscalingPolicy": {"mode": "ONLY_SCALE_OUT"}});
        assert!(settings(igm, Some(out_only), false).is_empty());
    }

    #[test]
    fn regional_redistribution_is_a_problem_unless_none() {
        let mut igm = safe();
        igm["updatePolicy"]["instanceRedistributionType"] = json!("PROACTIVE");
        assert_eq!(
            settings(igm.clone(), None, true),
            ["updatePolicy.instanceRedistributionType"]
        );
        assert!(
            settings(igm.clone(), None, false).is_empty(),
            "zonal MIGs do not redistribute"
        );
        igm["updatePolicy"]
            .as_object_mut()
            .map(|p| p.remove("instanceRedistributionType"));
        assert_eq!(
            settings(igm, None, true),
            ["updatePolicy.instanceRedistributionType"],
            "the default is PROACTIVE"
        );
    }

    #[test]
    fn a_proactive_update_policy_is_a_problem() {
        let mut igm = safe();
        igm["updatePolicy"]["type"] = json!("PROACTIVE");
        assert_eq!(settings(igm.clone(), None, false), ["updatePolicy.type"]);
        igm["updatePolicy"]
            .as_object_mut()
            .map(|p| p.remove("type"));
        let problems = check_settings(&igm, None, false);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].found, "not set (PROACTIVE)");
    }

    #[test]
    fn autohealing_with_a_short_initial_delay_is_a_problem() {
        let mut igm = safe();
        igm["autoHealingPolicies"][0]["initialDelaySec"] = json!(60);
        let problems = check_settings(&igm, None, false);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].setting, "autoHealingPolicies[].initialDelaySec");
        assert_eq!(problems[0].found, "60");
        igm["autoHealingPolicies"] = json!([{"healthCheck": "hc"}]);
        assert_eq!(
            check_settings(&igm, None, false)[0].found,
            "0",
            "the default delay is 0"
        );
    }

    #[test]
    fn compute_errors_are_classified_as_google_documents_them() {
        let err = |code: u16, reason: &str, message: &str| json!({"error": {"code": code, "message": message, "errors": [{"reason": reason, "domain": "usageLimits", "message": message}]}});
        assert_eq!(
            classify(403, &err(403, "rateLimitExceeded", "Rate Limit Exceeded")),
            Failure::RateLimited
        );
        assert_eq!(
            classify(
                403,
                &err(
                    403,
                    "forbidden",
                    "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com'"
                )
            ),
            Failure::RateLimited
        );
        assert_eq!(classify(429, &json!({})), Failure::RateLimited);
        assert_eq!(
            classify(
                403,
                &json!({"error": {"code": 403, "message": "x", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CONCURRENT_OPERATIONS_QUOTA_EXCEEDED"}]}})
            ),
            Failure::Transient
        );
        assert_eq!(
            classify(
                403,
                &err(
                    403,
                    "forbidden",
                    "Required 'compute.instanceGroupManagers.update' permission"
                )
            ),
            Failure::Fatal
        );
        assert_eq!(
            classify(409, &err(409, "conflict", "operationInProgress")),
            Failure::Transient
        );
        assert_eq!(
            classify(400, &err(400, "resourceNotReady", "not ready")),
            Failure::Transient
        );
        assert_eq!(classify(503, &json!({})), Failure::Transient);
        assert_eq!(classify(401, &json!({})), Failure::Unauthorized);
        assert_eq!(
            classify(404, &err(404, "notFound", "not found")),
            Failure::NotFound
        );
        assert_eq!(
            classify(400, &err(400, "invalid", "Invalid value")),
            Failure::Fatal
        );
    }

    #[test]
    fn managed_instances_map_onto_the_scalers_view() {
        use InstanceStatus::*;
        for (action, status, seen) in [
            ("CREATING", "", Creating),
            ("CREATING", "STAGING", Creating),
            ("NONE", "RUNNING", Running),
            ("VERIFYING", "RUNNING", Running),
            ("DELETING", "RUNNING", Stopping),
            ("NONE", "TERMINATED", Stopped),
            ("RECREATING", "STOPPING", Creating),
        ] {
            let mi = json!({"currentAction": action, "instanceStatus": status});
            assert_eq!(instance_status(&mi), seen, "{action} {status}");
        }
        assert_eq!(instance_status(&json!({"name": "x"})), Creating);
    }

    #[test]
    fn stock_outs_and_quotas_are_told_apart() {
        let mi = |code: &str| json!({"lastAttempt": {"errors": {"errors": [{"code": code, "message": "m"}]}}});
        assert!(matches!(
            create_trouble(&mi("ZONE_RESOURCE_POOL_EXHAUSTED")),
            Some(CreateTrouble::StockOut(_))
        ));
        assert!(matches!(
            create_trouble(&mi("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS")),
            Some(CreateTrouble::StockOut(_))
        ));
        assert!(matches!(
            create_trouble(&mi("QUOTA_EXCEEDED")),
            Some(CreateTrouble::Quota(_))
        ));
        assert!(matches!(
            create_trouble(&mi("PERMISSIONS_ERROR")),
            Some(CreateTrouble::Other(_))
        ));
        assert_eq!(create_trouble(&json!({"lastAttempt": {}})), None);
    }

    #[test]
    fn instance_names_follow_rfc_1035() {
        for ok in ["a", "ci-linux-0a1b2c", &"a".repeat(63)] {
            assert!(valid_instance_name(ok), "{ok}");
        }
        for bad in ["", "1abc", "Abc", "a_b", "a-", &"a".repeat(64)] {
            assert!(!valid_instance_name(bad), "{bad}");
        }
        assert_eq!(
            name_of("https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/ci-1"),
            "ci-1"
        );
        assert_eq!(name_of("ci-1"), "ci-1");
    }
}
