#version 330
// Scene and preset transitions: the frozen last frame fades into the live picture.
uniform sampler2D u_from;
uniform sampler2D u_input;
uniform float u_progress;
in vec2 uv;
out vec4 frag;
void main() {
    frag = vec4(mix(texture(u_from, uv).rgb, texture(u_input, uv).rgb, u_progress), 1.0);
}
