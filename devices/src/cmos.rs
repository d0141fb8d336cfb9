//! MC146818-style CMOS RTC at ports 0x70 (index) / 0x71 (data).
//!
//! Emulated: the time/date registers (0x00-0x09), status registers A-D, the century byte
//! (0x32, as the FADT says) and the rest of the 128 bytes as plain RAM. The clock is the host's
//! UTC time, in BCD and 24-hour mode, read afresh on every access; the update-in-progress flag
//! is never set. Not emulated: alarms, periodic and update interrupts (no IRQ 8), writable time.

use crate::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Century byte (FADT CENTURY field).
pub const REG_CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, UIP clear.
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD, no interrupts.
const STATUS_B: u8 = 0x02;
/// Status D: valid RAM and time.
const STATUS_D: u8 = 0x80;

/// The CMOS device.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> i64,
}

fn host_time() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS clocked by the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_time)
    }

    /// A CMOS clocked by `now` (seconds since the epoch); for tests.
    pub fn with_clock(now: fn() -> i64) -> Self {
        Self { index: 0, ram: [0; 128], now }
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let t = (self.now)();
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        match reg {
            REG_SECONDS => bcd(secs % 60),
            REG_MINUTES => bcd(secs / 60 % 60),
            REG_HOURS => bcd(secs / 3600),
            // 1970-01-01 was a Thursday; RTC weekday 1 = Sunday.
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u32),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year.rem_euclid(100) as u32),
            REG_CENTURY => bcd(year.div_euclid(100).rem_euclid(100) as u32),
            REG_A => STATUS_A,
            REG_B => STATUS_B,
            REG_C => 0,
            REG_D => STATUS_D,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            1 => self.read_reg(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; ignored.
            0 => self.index = v & 0x7f,
            1 if self.index > REG_D && self.index != REG_CENTURY => self.ram[usize::from(self.index)] = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reports_a_known_time_in_bcd() {
        // 2026-11-22 00:41:17 UTC, a Sunday.
        let mut c = Cmos::with_clock(|| 1_795_308_077);
        assert_eq!(read(&mut c, REG_SECONDS), 0x17);
        assert_eq!(read(&mut c, REG_MINUTES), 0x41);
        assert_eq!(read(&mut c, REG_HOURS), 0x00);
        assert_eq!(read(&mut c, REG_DAY), 0x22);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 1);
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "UIP never set");
        assert_eq!(read(&mut c, REG_D), 0x80);
    }

    #[test]
    fn ram_is_ram_and_clock_is_read_only() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x80 | 0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x33]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x00);
        assert_eq!(read(&mut c, REG_YEAR), 0x70);
        assert_eq!(read(&mut c, REG_CENTURY), 0x19);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
