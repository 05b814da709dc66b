//! What the examples share: printing within 100 columns.

/// `label` then `text`, wrapped to 100 columns, further lines indented.
pub fn say(label: &str, text: &str) {
    let mut line = label.to_string();
    for word in text.split(' ') {
        if line.len() + 1 + word.len() > 100 && !line.trim().is_empty() {
            println!("{line}");
            line = "    ".into();
        } else if !line.ends_with(' ') && !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    println!("{line}");
}
