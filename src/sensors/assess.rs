//! From model outputs to what an operator reads: a risk level from the predicted RUL, the 0..1
//! anomaly score from the raw reconstruction error, and the 0–100 health index.
//!
//! **Health index**: `health = 100 · clamp(rul / rul_cap, 0, 1) · (1 − w · excess)` where
//! `excess = clamp((anomaly − alarm) / (1 − alarm), 0, 1)` is how far the anomaly score is past
//! the alarm threshold (0.5 for the shipped calibration) and `w` is `--health-anomaly-weight`
//! (default 0.5). A unit with the full capped RUL and no anomaly is 100; health falls linearly
//! with RUL, and an anomalous window can at most halve it (default weight). Below the alarm
//! threshold the anomaly score does not lower health, so normal noise never does. Without an
//! anomaly model health is RUL alone. The health of a *unit* is the health of its latest window.

use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Normal,
    Warning,
    Critical,
}

impl Risk {
    pub const LEVELS: [Risk; 3] = [Risk::Normal, Risk::Warning, Risk::Critical];

    pub fn name(self) -> &'static str {
        match self {
            Risk::Normal => "normal",
            Risk::Warning => "warning",
            Risk::Critical => "critical",
        }
    }

    /// The code stored in HDF5 results (0 normal, 1 warning, 2 critical).
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Risk> {
        Risk::LEVELS.get(code as usize).copied()
    }
}

/// Thresholds and weights that turn predictions into risk and health; every one is a flag and
/// an environment variable, and can be overridden per request or job.
#[derive(Debug, Clone, Copy, PartialEq, Args, Serialize, Deserialize)]
pub struct AssessSettings {
    /// RUL at or below this many cycles is critical.
    #[arg(
        long = "risk-critical",
        env = "LINESCAN_RISK_CRITICAL",
        default_value_t = 30.0,
        value_parser = crate::config::non_negative
    )]
    pub critical: f64,
    /// RUL at or below this many cycles (and above critical) is a warning.
    #[arg(
        long = "risk-warning",
        env = "LINESCAN_RISK_WARNING",
        default_value_t = 80.0,
        value_parser = crate::config::non_negative
    )]
    pub warning: f64,
    /// How much an anomaly past the alarm threshold lowers health (0 ignores anomalies, 1 can
    /// take health to 0).
    #[arg(
        long = "health-anomaly-weight",
        env = "LINESCAN_HEALTH_ANOMALY_WEIGHT",
        default_value_t = 0.5,
        value_parser = crate::config::unit_interval::<f64>
    )]
    pub health_anomaly_weight: f64,
}

impl Default for AssessSettings {
    fn default() -> Self {
        AssessSettings {
            critical: 30.0,
            warning: 80.0,
            health_anomaly_weight: 0.5,
        }
    }
}

impl AssessSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.critical.is_finite() && self.warning.is_finite() && self.critical >= 0.0) {
            return Err(format!(
                "risk thresholds must be finite and non-negative (critical {}, warning {})",
                self.critical, self.warning
            ));
        }
        if self.critical > self.warning {
            return Err(format!(
                "the critical threshold ({}) must not be above the warning threshold ({})",
                self.critical, self.warning
            ));
        }
        if !(0.0..=1.0).contains(&self.health_anomaly_weight) {
            return Err(format!(
                "health anomaly weight {} must be within 0..1",
                self.health_anomaly_weight
            ));
        }
        Ok(())
    }

    /// These settings with the overrides that are given.
    pub fn with(&self, critical: Option<f64>, warning: Option<f64>) -> AssessSettings {
        AssessSettings {
            critical: critical.unwrap_or(self.critical),
            warning: warning.unwrap_or(self.warning),
            ..*self
        }
    }

    pub fn risk(&self, rul: f32) -> Risk {
        let rul = rul as f64;
        if rul <= self.critical {
            Risk::Critical
        } else if rul <= self.warning {
            Risk::Warning
        } else {
            Risk::Normal
        }
    }

    /// The 0–100 health index (see the module documentation).
    pub fn health(&self, rul: f32, rul_cap: f64, anomaly: Option<f32>, alarm: f64) -> f32 {
        let remaining = (rul as f64 / rul_cap).clamp(0.0, 1.0);
        let excess = match anomaly {
            Some(score) if alarm < 1.0 => ((score as f64 - alarm) / (1.0 - alarm)).clamp(0.0, 1.0),
            _ => 0.0,
        };
        (100.0 * remaining * (1.0 - self.health_anomaly_weight * excess)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_levels_follow_the_thresholds() {
        let settings = AssessSettings::default();
        assert_eq!(settings.risk(10.0), Risk::Critical);
        assert_eq!(settings.risk(30.0), Risk::Critical);
        assert_eq!(settings.risk(30.5), Risk::Warning);
        assert_eq!(settings.risk(80.0), Risk::Warning);
        assert_eq!(settings.risk(81.0), Risk::Normal);
        let custom = settings.with(Some(5.0), Some(10.0));
        assert_eq!(custom.risk(30.0), Risk::Normal);
        assert!(settings.with(Some(90.0), None).validate().is_err());
        assert_eq!(Risk::from_code(Risk::Critical.code()), Some(Risk::Critical));
    }

    #[test]
    fn health_is_rul_fraction_lowered_by_anomalies_past_the_alarm() {
        let s = AssessSettings::default();
        assert_eq!(s.health(125.0, 125.0, Some(0.0), 0.5), 100.0);
        assert_eq!(s.health(200.0, 125.0, None, 0.5), 100.0);
        assert!((s.health(62.5, 125.0, Some(0.5), 0.5) - 50.0).abs() < 1e-4);
        assert!((s.health(125.0, 125.0, Some(1.0), 0.5) - 50.0).abs() < 1e-4);
        assert!((s.health(125.0, 125.0, Some(0.75), 0.5) - 75.0).abs() < 1e-4);
        assert_eq!(s.health(-3.0, 125.0, Some(1.0), 0.5), 0.0);
    }
}
