// Trails: the previous output frame, zoomed and rotated a little, stays behind.
uniform sampler2D u_previous;
uniform float u_feedback_amount;
uniform float u_feedback_zoom;
uniform mat2 u_feedback_rotation;   // built on the CPU: no trigonometry per pixel

vec3 feedback(vec3 c, vec2 p) {
    if (u_feedback_amount <= 0.0) return c;
    vec2 q = u_feedback_rotation * (p - 0.5) / u_feedback_zoom + 0.5;
    return mix(c, texture(u_previous, q).rgb, u_feedback_amount);
}
